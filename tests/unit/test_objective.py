"""The training objective: which chains count (length curriculum, receptive field) and the masked loss."""

import torch

from mythos_dist.config import Config, ModelConfig
from mythos_dist.model import RDT
from mythos_dist.objective import answer_forward, longest_counted, loss_and_metrics


def config(**train) -> Config:
    cfg = Config(model=ModelConfig(dim=32, n_heads=4, n_kv_heads=2, n_experts=4, n_experts_per_tok=2,
                                   expert_dim=16, max_seq_len=64, attn_window=4))  # fmt: skip
    cfg.data.task.train_lengths = (2, 12)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


def test_longest_counted_follows_curriculum_and_receptive_field() -> None:
    assert longest_counted(config(), step=0, n_loops=1) is None  # both off: every chain counts
    cur = config(length_curriculum_steps=900)
    # from the shortest train length + 1 (3) to the longest (12), linearly over 900 steps, then 12
    assert [longest_counted(cur, s, 4) for s in (0, 99, 100, 450, 899, 900, 5000)] == [3, 3, 4, 7, 11, 12, 12]
    reach = config(reachable_only=True)  # window 4: 3 tokens per layer, prelude + loops + coda layers
    assert [longest_counted(reach, 0, n) for n in (1, 2, 8)] == [9, 12, 30]
    # a step's own window (train.attn_windows) overrides the model's: window 2 moves 1 token per layer
    assert [longest_counted(reach, 0, n, attn_window=2) for n in (1, 2, 8)] == [3, 4, 10]
    both = config(reachable_only=True, length_curriculum_steps=900)
    assert longest_counted(both, 800, 1) == 9 and longest_counted(both, 100, 8) == 4


def test_masked_loss_ignores_uncounted_chains() -> None:
    """Only chains of ≤ `longest` digits enter the cross-entropy, the accuracy and the gradient:
    the masked loss equals the loss of the counted rows alone, and with none counted it is zero
    but still backpropagates (every rank must run the same backward)."""
    cfg = config()
    torch.manual_seed(0)
    model = RDT(cfg.model)
    lengths = torch.tensor([2, 5, 9, 12])
    ids = torch.full((4, 13), 11)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(0, 10, (n,))
        ids[i, n] = 10
    batch = {"input_ids": ids, "loss_mask": torch.arange(13)[None] == lengths[:, None],
             "answer": torch.tensor([1, 2, 3, 4]), "length": lengths}  # fmt: skip
    loss, m = loss_and_metrics(answer_forward(model, batch, 2), batch, cfg.model, longest=6)
    sub = {k: v[:2] for k, v in batch.items()}
    ref, m_ref = loss_and_metrics(answer_forward(model, sub, 2), sub, cfg.model)
    torch.testing.assert_close(m["ce"], m_ref["ce"])
    assert m["n"].item() == 2 and m["correct"].item() == m_ref["correct"].item()
    assert loss_and_metrics(answer_forward(model, batch, 2), batch, cfg.model)[1]["n"].item() == 4
    g = torch.autograd.grad(loss - m["aux_loss"], model.embed.weight)[0]
    g_ref = torch.autograd.grad(ref - m_ref["aux_loss"], model.embed.weight)[0]
    torch.testing.assert_close(g, g_ref)
    none, m0 = loss_and_metrics(answer_forward(model, batch, 2), batch, cfg.model, longest=1)
    assert m0["n"].item() == 0 and m0["ce"].item() == 0.0
    none.backward()  # connected to the graph
