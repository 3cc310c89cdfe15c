"""Sampling shared by every runner and by speculative decoding: the sampler (`sampler.py`: logits processors,
greedy, temperature, top-k / top-p / min-p, per-request seeds, logprobs), the CPU's inverse-CDF sampler
(`cpu_sampling.py`), the rejection sampler that verifies draft tokens (`rejection.py`) and logprob tensors back into
the dicts `ModelRunnerOutput` carries (`logprobs.py`). No plugin module is imported here: runner and proposer plugins
import this package, never each other."""
