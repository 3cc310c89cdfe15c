# A typical vLLM logprobs script (the one issue 29 reports crashing on `cumulative_logprob`), written against vLLM's
# API with `from vllm import` -> `from weavelm import` and `from vllm.inputs import` -> `from weavelm.inputs import`.

from weavelm import LLM, SamplingParams
from weavelm.inputs import TokensPrompt

llm = LLM(model="facebook/opt-125m", max_logprobs=20, kv_cache_dtype="auto", tokenizer_mode="auto",
          trust_remote_code=False, seed=0, disable_log_stats=True, swap_space=4)
tokenizer = llm.get_tokenizer()
sampling_params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=1)

prompts = [
    "The capital of France is",
    TokensPrompt(prompt_token_ids=tokenizer.encode("The future of AI is")),
]
outputs = llm.generate(prompts, sampling_params, use_tqdm=False)
for output in outputs:
    completion = output.outputs[0]
    print(f"Prompt: {output.prompt!r}")
    print(f"Generated text: {completion.text!r}")
    print(f"Cumulative logprob: {completion.cumulative_logprob:.4f}")
    for token_id, logprobs in zip(completion.token_ids, completion.logprobs):
        chosen = logprobs[token_id]
        top = sorted(logprobs.values(), key=lambda lp: lp.rank)
        alternatives = ", ".join(f"{lp.decoded_token!r}: {lp.logprob:.3f}" for lp in top)
        print(f"  {chosen.decoded_token!r} (rank {chosen.rank}, {chosen.logprob:.3f}) among [{alternatives}]")
    prompt_lps = [lp for lp in output.prompt_logprobs[1:]]
    print(f"Prompt logprobs of {len(prompt_lps)} tokens; first: "
          f"{[(lp.decoded_token, round(lp.logprob, 3)) for lp in prompt_lps[0].values()]}")
print(f"Engine: {type(llm.llm_engine).__name__}")
