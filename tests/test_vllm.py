"""A LoRA update served through vLLM's multi-LoRA engine gives unisteer's steered next-token distribution.

Runs only where vLLM and a CUDA GPU exist (docs/VLLM.md); elsewhere it is skipped with the reason. The
adapter is the PEFT export with the multiplier folded into its scale; the reference is unisteer's hooked
update on the same weights in fp32.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU"),
]

PROMPTS = ["The capital of France is", "Is it ever right to lie? Answer:", "My favourite animal is the"]


def test_vllm_lora_matches_unisteer_steering(tmp_path):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from unisteer.engine.models import ensure_alias, load_model
    from unisteer.engine.steering import Steering
    from unisteer.engine.storage import export_peft_adapter
    from unisteer.engine.updates import create_update

    folder = ensure_alias("smollm2-135m-instruct")
    model, tokenizer = load_model(str(folder), dtype="float32", device="cuda")
    update = create_update(model, "lora", 15, rank=4, seed=0)
    with torch.no_grad():
        update.lora_B.normal_(std=0.05)
    multiplier = 3.0
    adapter = export_peft_adapter(update, model, tmp_path / "adapter", multiplier=multiplier)

    expected = []
    with torch.no_grad(), Steering(model, update, multiplier=multiplier):
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
            expected.append(torch.log_softmax(model(ids).logits[0, -1].float(), -1).cpu())
    del model
    torch.cuda.empty_cache()

    llm = LLM(model=str(folder), dtype="float32", enable_lora=True, max_lora_rank=8, enforce_eager=True,
              gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    outputs = llm.generate(PROMPTS, params, lora_request=LoRARequest("steer", 1, str(adapter)))
    for reference, output in zip(expected, outputs, strict=True):
        top = output.outputs[0].logprobs[0]
        for token_id, logprob in top.items():
            assert logprob.logprob == pytest.approx(float(reference[token_id]), abs=2e-2)
        assert output.outputs[0].token_ids[0] == int(reference.argmax())
