"""A third-party proposer for tests/test_spec_hidden_states.py, built only from `weavelm.plugin` (registered through
`registry.register_module`): it asks for the target's hidden states and checks every batch it is handed against
the target's LM head. Its drafts come from `oracle`, whole sequences (prompt + greedy output) the test knows: a row
whose tokens begin one of them gets its continuation, any other row its last token repeated (mostly rejected)."""

import torch
from safetensors.torch import load_file

from weavelm.plugin import Proposal, ProposeInput, Proposer, ProposerOptions, hookimpl


class HiddenCheckOptions(ProposerOptions):
    head: str  # the target's model.safetensors: its lm_head.weight turns hidden states back into logits
    oracle: list[list[int]] = []


class HiddenCheckProposer(Proposer):
    name = "hidden_check"
    description = "Test proposer: checks the target hidden states it receives; drafts the last token."
    Options = HiddenCheckOptions
    uses_hidden_states = True

    def load(self, target_info):
        self.lm_head = load_file(self.options.head)["lm_head.weight"]

    def propose(self, inp: ProposeInput) -> Proposal:
        counts = [len(s) for s in inp.sampled_token_ids]
        total = sum(counts)
        hidden = inp.hidden_states
        if hidden is None or tuple(hidden.shape) != (total, self.lm_head.shape[1]) or len(inp.positions) != total:
            raise AssertionError(f"hidden states {None if hidden is None else tuple(hidden.shape)} for {counts}")
        logits = hidden.float().cpu() @ self.lm_head.T
        best = logits.max(-1).values
        start = 0
        for i, tokens in enumerate(inp.token_ids):
            assert int(inp.num_computed_tokens[i]) == len(tokens) - 1
            pos = inp.positions[start:start + counts[i]]
            assert list(tokens[pos + 1]) == inp.sampled_token_ids[i] == list(tokens[len(tokens) - counts[i]:])
            if inp.temperature[i] == 0:  # a greedy row's tokens are the argmax of the head at those positions
                rows = torch.arange(start, start + counts[i])
                chosen = logits[rows, torch.tensor(inp.sampled_token_ids[i])]
                assert (chosen >= best[rows] - 1e-4 * best[rows].abs().clamp(min=1)).all(), (chosen, best[rows])
            start += counts[i]
        return Proposal([self._draft(list(t), k) for t, k in zip(inp.token_ids, inp.max_tokens)])

    def _draft(self, tokens: list[int], k: int) -> list[int]:
        for seq in self.options.oracle:
            if seq[:len(tokens)] == tokens:
                return seq[len(tokens):len(tokens) + k]
        return [tokens[-1]] * k


@hookimpl
def weavelm_register(registry):
    registry.add("proposer", HiddenCheckProposer.name, HiddenCheckProposer)
