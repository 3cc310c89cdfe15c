"""M-RoPE positions (Qwen2-VL, Qwen2.5-VL): three position rows - temporal, height, width - for every token.

Text tokens carry one position on all three rows, counting on from the previous token. An image's (or video's)
run of placeholder tokens, `t * (h / m) * (w / m)` of them for a grid of `(t, h, w)` patches merged `m x m`, takes
the positions of its merged grid offset by the current position `p`: row 0 `p + frame * time_interval`, row 1
`p + grid row`, row 2 `p + grid column`; the text after it resumes at `p + max(h, w) / m` (transformers 5's
`Qwen2VLModel.get_rope_index`, the reference here; for images this is the largest position + 1, as in Qwen's own
code and vLLM, which also resume there after a video whose frames reach further). Every token past the prompt (the generated ones) is at `index + delta` on all three
rows, `delta` being the prompt's largest position + 1 - its length.

Pure functions of the token ids and the grids, so the frontend, the runner (chunked prefill, decode) and tests
compute the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VisionPlacement:
    """One image or video of a prompt, in prompt order: its placeholder `token_id`, its patch `grid` (t, h, w), and
    the temporal step between its frames in position units (1 for images and Qwen2-VL videos)."""

    token_id: int
    grid: tuple[int, int, int]
    time_interval: float = 1.0


@dataclass(frozen=True)
class MRopePositions:
    """A request's M-RoPE positions: `prompt` (3, prompt_len) int64; a token at index i >= prompt_len sits at
    `i + delta` on all three rows."""

    prompt: np.ndarray
    delta: int

    def rows(self, index: np.ndarray) -> np.ndarray:
        """(3, len(index)) int64 positions of the request's tokens at `index` (any mix of prompt and later
        tokens: a prefill chunk, a decode step, speculative drafts)."""
        index = np.asarray(index, dtype=np.int64)
        inside = index < self.prompt.shape[1]
        if inside.all():
            return self.prompt[:, index]
        out = np.broadcast_to(index + self.delta, (3, len(index))).copy()
        out[:, inside] = self.prompt[:, index[inside]]
        return out


def text_positions(num_tokens: int) -> MRopePositions:
    """A prompt without images: position i on every row."""
    return MRopePositions(np.broadcast_to(np.arange(num_tokens, dtype=np.int64), (3, num_tokens)).copy(), 0)


def mrope_positions(token_ids: Sequence[int], placements: Sequence[VisionPlacement],
                    spatial_merge_size: int) -> MRopePositions:
    """The M-RoPE positions of a prompt holding `placements`. Placements of one token id (the images, the videos)
    are taken in their given order; different token ids interleave as their runs appear in the prompt. Each takes
    the next `t * h * w // m**2` tokens equal to its `token_id` (two images back to back are two runs). ValueError
    when a run is missing or shorter than its grid needs, or placeholders are left over."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    m = spatial_merge_size
    queues: dict[int, list[VisionPlacement]] = {}
    for item in placements:
        queues.setdefault(item.token_id, []).append(item)
    pieces, cursor, pos, count = [], 0, 0, 0
    while any(queues.values()):
        starts = {}
        for token_id, queue in queues.items():
            if queue:
                hits = np.flatnonzero(tokens[cursor:] == token_id)
                if not len(hits):
                    raise ValueError(f"{len(queue)} image(s) of placeholder {token_id} have no placeholder run left "
                                     f"in the prompt")
                starts[token_id] = cursor + int(hits[0])
        token_id = min(starts, key=starts.get)
        start, item = starts[token_id], queues[token_id].pop(0)
        t, h, w = (int(v) for v in item.grid)
        if h % m or w % m:
            raise ValueError(f"image {count}: grid {item.grid} is not divisible by the merge size {m}")
        gh, gw = h // m, w // m
        n = t * gh * gw
        if start + n > len(tokens) or not (tokens[start:start + n] == token_id).all():
            raise ValueError(f"image {count}: needs {n} consecutive placeholder tokens {token_id} at index {start}")
        text = start - cursor
        pieces.append(np.broadcast_to(np.arange(text, dtype=np.int64) + pos, (3, text)))
        pos += text
        frames = (np.arange(t) * item.time_interval).astype(np.int64)
        grid = np.stack(np.meshgrid(frames, np.arange(gh), np.arange(gw), indexing="ij")).reshape(3, -1) + pos
        pieces.append(grid.astype(np.int64))
        pos += max(gh, gw)
        cursor, count = start + n, count + 1
    ids = [p.token_id for p in placements]
    if ids and np.isin(tokens[cursor:], ids).any():
        raise ValueError(f"the prompt has more placeholder tokens than its {len(placements)} image(s) need")
    rest = len(tokens) - cursor
    pieces.append(np.broadcast_to(np.arange(rest, dtype=np.int64) + pos, (3, rest)))
    prompt = np.ascontiguousarray(np.concatenate(pieces, axis=1))
    delta = int(prompt.max()) + 1 - len(tokens) if len(tokens) else 0
    return MRopePositions(prompt, delta)
