"""Late-bound units through the whole engine: a toy model whose block steps pick their weights
from the previous step's output (a stand-in for a Mixture-of-Experts router), registered like
any architecture, streamed under a budget with the same tokens as a resident run."""

from __future__ import annotations

import asyncio
import sys
import types

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.loaders import layer_key
from stream_run.models import REGISTRY, Entry, llama
from stream_run.models.base import Batch, Call, LateUnits

PROMPT = [1, 5, 9, 14, 3, 7]
PICKS: list[tuple[int, str]] = []


class RoutedModel(llama.Model):
    """Block i runs on layer i's weights or layer (i + 1) % n's, chosen by the sign of one
    value of the hidden state the step before produced: the choice is known only at run time,
    so the scheduler resolves each block's unit from that output."""

    def calls(self, batch: Batch, tile_rows: int | None = None) -> list[Call]:
        static = super().calls(batch)  # one tile: this toy's prompts are a few rows
        ctx = self.pass_context(batch)
        n = self.spec.num_hidden_layers

        def route(i: int):
            def units(h) -> tuple[str, ...]:
                j = i if float(np.asarray(h)[0, -1, 0]) >= 0 else (i + 1) % n
                PICKS.append((i, layer_key(j)))
                return (layer_key(j),)
            return units

        def run(i: int):
            def block(h, weights):
                (chosen,) = weights.values()
                return self.block(i, batch, ctx, h, {layer_key(i): chosen})
            return block

        blocks = [Call(route(i), run(i), f"routed.{i}", candidates=self._candidates(i))
                  for i in range(n)]
        return [static[0], *blocks, static[-1]]

    def _candidates(self, i: int) -> tuple[str, ...]:
        return layer_key(i), layer_key((i + 1) % self.spec.num_hidden_layers)

    def units(self):  # the block units are known only during a pass
        layout = self.layout()
        blocks = [LateUnits(self._candidates(i)) for i in range(self.spec.num_hidden_layers)]
        return [layout[0], *blocks, layout[-1]]


@pytest.fixture
def routed_type(monkeypatch):
    module = types.ModuleType("toy_routed.model")
    module.Model = RoutedModel
    module.architecture = lambda model_type: llama.architecture("llama")
    monkeypatch.setitem(sys.modules, "toy_routed.model", module)
    monkeypatch.setitem(REGISTRY.entries, "toy_routed", Entry("toy_routed.model", "ToyForCausalLM"))
    return "toy_routed"


def generate(path, budget=None) -> tuple[list[int], int]:
    async def run():
        first = None if budget == "min" else budget
        engine = await Engine.open(str(path), EngineConfig(memory_budget_bytes=first,
                                                            backend="numpy"))
        if budget == "min":
            need = engine.min_budget_bytes
            engine.close()
            engine = await Engine.open(str(path), EngineConfig(memory_budget_bytes=need,
                                                                backend="numpy"))
        try:
            params = GenerationParams(max_tokens=12, ignore_eos=True)
            done = await engine.complete(PROMPT, params)
            return done.token_ids, done.stats.bytes_read, engine.model_bytes
        finally:
            engine.close()
    return asyncio.run(run())


def test_routed_model_streams_with_the_tokens_of_a_resident_run(routed_type, tiny_model_dir):
    path, cfg, _ = tiny_model_dir("llama", n_layers=4, config_overrides={
        "model_type": routed_type})
    PICKS.clear()
    resident, _, model_bytes = generate(path)
    assert {key for i, key in PICKS if key != layer_key(i)}  # some block took other weights
    for budget in (model_bytes // 2, "min"):  # "min": the smallest budget the engine accepts
        PICKS.clear()
        streamed, bytes_read, _ = generate(path, budget=budget)
        assert streamed == resident
        assert bytes_read > model_bytes  # the routed blocks were read again and again
