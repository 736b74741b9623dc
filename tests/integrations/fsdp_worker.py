"""One process of tests/integrations/test_transformers.py's FSDP2 check (run under torchrun, 2
CPU processes, gloo): causal_lm_logprobs on a fully_shard-ed tiny Qwen2 equals the log_softmax
of an unsharded copy's own logits, and so do the gathered parameter gradients."""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_models import build_tiny_model, train_tokenizer  # noqa: E402
from pyalign.integrations.transformers import causal_lm_logprobs  # noqa: E402


def main():
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    tokenizer = train_tokenizer()
    model = build_tiny_model("qwen2", tokenizer)
    reference = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root group: embeddings, final norm, lm_head
    assert type(model.lm_head.weight).__name__ == "DTensor"

    torch.manual_seed(dist.get_rank())  # each rank its own batch
    input_ids = torch.randint(3, len(tokenizer), (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    upstream = torch.randn(2, 6, dtype=torch.float64)
    out = causal_lm_logprobs(model, input_ids, attention_mask=attention_mask, entropy=True)
    (out.logprobs * upstream.float() + out.entropy).sum().backward()

    logp = reference(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logp = logp.double().log_softmax(-1)
    mask = attention_mask[:, 1:].bool()
    want = torch.where(mask, logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1), 0)
    entropy = torch.where(mask, -(logp.exp() * logp).sum(-1), 0)
    (want * upstream + entropy).sum().backward()
    torch.testing.assert_close(out.logprobs.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), entropy, atol=2e-5, rtol=1e-5)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters(),
                                        strict=True):
        # FSDP2 averages gradients over ranks: the reference's gradient, averaged the same way.
        ref_grad = ref_param.grad.clone()
        dist.all_reduce(ref_grad)
        torch.testing.assert_close(param.grad.full_tensor(), ref_grad / world, atol=5e-5,
                                   rtol=1e-4, msg=name)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
