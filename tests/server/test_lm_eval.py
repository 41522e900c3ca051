"""lm-evaluation-harness's `local-completions` model runs a loglikelihood task against
stream-serve on SmolLM2 (issue 20 target): every loglikelihood equals stream-eval's own
scoring of the same ids (engine/perplexity.py's token_nll on one forward pass) within 1e-3 nats
per token, and is_greedy agrees.

The task is defined from a local JSONL file (no hub download); the tokenizer lm-eval uses is
the model's own, saved as an HF tokenizer directory. Skips when lm_eval is not installed (it
is not a test dependency: `pip install "lm_eval[api]"`)."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.engine.perplexity import token_nll
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread

NAME = "smollm2"
DOCS = [
    ("The capital of France is", " Paris."),
    ("The capital of France is", " Berlin."),
    ("Water boils at a temperature of one hundred degrees", " Celsius at sea level."),
    ("Once upon a time, there was a little", " girl who lived in a village near the forest."),
    ("1, 2, 3, 4, 5,", " 6, 7, 8"),
    ("Question: What color is the sky on a clear day?\nAnswer:", " Blue"),
]
TOLERANCE = 1e-3  # nats per continuation token


def write_task(tmp_path) -> str:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n"
                            for c, t in DOCS))
    (tmp_path / "streamrun_ll.yaml").write_text(f"""task: streamrun_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return str(tmp_path)


def write_hf_tokenizer(engine: Engine, path) -> str:
    """The model's tokenizer as an HF directory (lm-eval tokenizes the requests itself)."""
    path.mkdir()
    engine.tokenizer.tok.save(str(path / "tokenizer.json"))
    data = engine.tokenizer.data
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": data.bos_token,
        "eos_token": data.eos_token, "add_bos_token": False}))
    return str(path)


def encode_pair(engine: Engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split for causal models (api/model.py _encode_pair): trailing spaces move to
    the continuation; the whole is encoded and cut at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = engine.tokenizer.encode(context + continuation, add_bos=False)
    ctx = engine.tokenizer.encode(context, add_bos=False)
    return ctx, whole[len(ctx):]


def reference(model: str) -> list[tuple[float, bool, int]]:
    """(loglikelihood, is_greedy, continuation tokens) per doc, as stream-eval scores."""

    async def run():
        engine = await Engine.open(model, EngineConfig(backend="numpy"))
        try:
            pairs = await asyncio.to_thread(
                lambda: [encode_pair(engine, c, t) for c, t in DOCS])
            out = []
            for ctx, cont in pairs:
                ids = ctx + cont
                logits = await engine.logits(ids)
                rows = logits[len(ctx) - 1:len(ids) - 1]
                nll = token_nll(rows, np.asarray(cont))
                greedy = bool((rows.argmax(axis=1) == np.asarray(cont)).all())
                out.append((-float(nll.sum()), greedy, len(cont)))
            return out
        finally:
            engine.close()

    return asyncio.run(run())


@pytest.mark.slow
def test_lm_eval_loglikelihoods_equal_stream_eval(smollm2_gguf, tmp_path, monkeypatch,
                                                  capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed "
                        "(pip install 'lm_eval[api]')")
    pytest.importorskip("tenacity", reason="lm_eval's API models need lm_eval[api]")
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    want = reference(smollm2_gguf)
    srv = ServerThread.for_model(smollm2_gguf, ServerConfig(NAME))
    try:
        engine = srv.wait_loaded()
        tokenizer = write_hf_tokenizer(engine, tmp_path / "tokenizer")
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": srv.base_url + "/v1/completions", "model": NAME,
                        "tokenizer": tokenizer, "tokenizer_backend": "huggingface",
                        "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1},
            tasks=["streamrun_ll"], task_manager=TaskManager(include_path=write_task(tmp_path)),
            log_samples=True, batch_size=2)
    finally:
        srv.close()
    samples = sorted(results["samples"]["streamrun_ll"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    worst = 0.0
    with capsys.disabled():
        print("\nlm-eval local-completions vs stream-eval (SmolLM2-135M-Instruct Q4_1):")
        for s, (ll, greedy, n) in zip(samples, want, strict=True):
            got_ll, got_greedy = s["resps"][0][0]
            per_token = abs(float(got_ll) - ll) / n
            worst = max(worst, per_token)
            print(f"  doc {s['doc_id']}: lm-eval {float(got_ll):.6f}  stream-eval {ll:.6f}  "
                  f"({n} tokens, |diff|/token {per_token:.2e}, greedy {got_greedy}/{greedy})")
            assert per_token <= TOLERANCE
            assert bool(got_greedy) == greedy
        print(f"  worst |diff| per token: {worst:.2e} nats (target {TOLERANCE:g})")
