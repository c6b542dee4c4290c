"""trainer/packing.py: token-budget packing, scatter / split, and packed log-probs equal to unpacked ones."""

from __future__ import annotations

import torch

from sodkern.trainer.packing import make_micro_batch, pack


def test_pack_budget_and_scatter_split_roundtrip():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 12, 5, 30, 9]
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in lengths]
    masks = [torch.rand(n, generator=g) > 0.4 for n in lengths]
    mbs = pack(seqs, masks, token_budget=32)
    assert sorted(i for mb in mbs for i in mb.index) == list(range(len(seqs)))
    assert all(mb.num_tokens <= 32 for mb in mbs)
    for mb in mbs:
        for i, (a, b) in zip(mb.index, mb.bounds):
            assert torch.equal(mb.input_ids[0, a:b], seqs[i])
            assert torch.equal(mb.position_ids[0, a:b], torch.arange(b - a))
            assert torch.equal(mb.targets[0, a : b - 1], seqs[i][1:])
            assert torch.equal(mb.loss_mask[0, a:b], torch.cat([masks[i][1:], torch.tensor([False])]))
        values = [torch.randn(int(mb.loss_mask[0, a:b].sum()), generator=g) for a, b in mb.bounds]
        row = mb.scatter(values)
        assert (row[~mb.loss_mask] == 0).all()
        assert all(torch.equal(x, y) for x, y in zip(mb.split(row), values))


def test_packed_logprobs_match_unpacked(world, tiny_path):
    """SDPA on a packed row keeps sequences apart (block-diagonal mask from the position ids)."""
    from sodkern import linear_logprobs
    from sodkern.trainer.parallel import CausalLM, load_causal_lm, shard

    model = shard(CausalLM(load_causal_lm(str(tiny_path), device=world.device, dtype=torch.float32)), world.mesh,
                  compute_dtype=torch.float32)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 500, (n,), generator=g) for n in (9, 16, 5)]
    masks = [torch.ones(n, dtype=torch.bool) for n in (9, 16, 5)]

    def logprobs(mb, position_ids):
        with torch.no_grad():
            return model(mb.input_ids, position_ids, lambda h, w: linear_logprobs(h[0], w, mb.targets[0]))

    (mb,) = pack(seqs, masks, token_budget=64)
    packed = mb.split(logprobs(mb, mb.position_ids)[None])
    alone = [logprobs(one, one.position_ids)[one.loss_mask[0]] for one in (make_micro_batch([s], [m], [0])
             for s, m in zip(seqs, masks))]  # fmt: skip
    for i, lp in zip(mb.index, packed):
        torch.testing.assert_close(lp, alone[i], rtol=1e-5, atol=1e-5)
    # negative control: one running position sequence lets later sequences attend to earlier ones
    leaked = mb.split(logprobs(mb, torch.arange(mb.num_tokens)[None])[None])
    assert any(not torch.allclose(lp, alone[i], atol=1e-3) for i, lp in zip(mb.index[1:], leaked[1:]))
