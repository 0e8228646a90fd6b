"""Assembling ``kvbridge serve`` from a ``ServeConfig``: engine, engine loop, metrics, app."""

from __future__ import annotations

import logging
from typing import NamedTuple

from fastapi import FastAPI

from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.serve.api import build_app
from kvbridge.serve.config_file import ServeConfig
from kvbridge.serve.engine_loop import EngineLoop
from kvbridge.serve.metrics import ServerMetrics
from kvbridge.serve.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class ServerParts(NamedTuple):
    """What build_server returns: the app, its engine loop and its metrics."""

    app: FastAPI
    loop: EngineLoop
    metrics: ServerMetrics


def build_engine_config(config: ServeConfig) -> EngineConfig:
    return EngineConfig(**config.engine_kwargs())


def build_server(config: ServeConfig, engine: LLMEngine | None = None) -> ServerParts:
    """Engine (unless given), its loop, metrics, tokenizer and the app around them."""
    engine = engine if engine is not None else LLMEngine(build_engine_config(config))
    metrics = ServerMetrics(config.model_name)
    loop = EngineLoop(engine, metrics)
    tokenizer = load_tokenizer(config.model, bos_token_id=engine.model_config.bos_token_id)
    app = build_app(
        loop,
        tokenizer,
        metrics,
        model_name=config.model_name,
        max_body_bytes=config.max_body_bytes,
    )
    return ServerParts(app, loop, metrics)
