"""Shared fixtures: the seeded, offline builders of tests/builders.py, built lazily.

Everything is session-scoped and built on first use under one session temp folder, so
a test run pays only for the cases it touches (a PEFT case costs ~0.05 s once
transformers is imported). The built files are shared: treat them as read-only and
copy them (shutil.copytree) before anything that writes next to or into them.

Fixtures
  fixture_root               the session folder everything is built under
  base_dir_factory(kind)     -> Path of a base model folder (kinds: builders.BASE_KINDS)
  llama_base_dir, llama_bias_base_dir, llama_bf16_base_dir, llama_sharded_base_dir,
  gpt2_base_dir              the same, one fixture per kind
  peft_case_factory(kind)    -> builders.PeftCase (kinds: builders.PEFT_CASE_KINDS)
  peft_case                  parametrized over every PEFT case kind (ids = kind)
  llama_plain_case           the "llama_plain" PeftCase
  sd_base_file               the single-file mini-UNet + text-encoder base
  kohya_case                 builders.KohyaCase
  diffusers_case_factory(kind) / diffusers_case (parametrized) / diffusers_current_case /
  diffusers_legacy_case      builders.DiffusersCase
  malformed_files            name -> Path, see builders.malformed_files
  pickle_marker              the Path the malicious pickle would create (must never exist)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from builders import (
    BASE_KINDS,
    DIFFUSERS_CASE_KINDS,
    PEFT_CASE_KINDS,
    DiffusersCase,
    KohyaCase,
    PeftCase,
    build_base,
    build_diffusers_case,
    build_kohya_case,
    build_peft_case,
    build_sd_base,
    malformed_files as build_malformed_files,
    pickle_marker_path,
)


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora_fixtures")


@pytest.fixture(scope="session")
def base_dir_factory(fixture_root: Path) -> Callable[[str], Path]:
    def get(kind: str) -> Path:
        assert kind in BASE_KINDS, kind
        return build_base(kind, fixture_root)  # idempotent: built once per session

    return get


@pytest.fixture(scope="session")
def llama_base_dir(base_dir_factory: Callable[[str], Path]) -> Path:
    return base_dir_factory("llama")


@pytest.fixture(scope="session")
def llama_bias_base_dir(base_dir_factory: Callable[[str], Path]) -> Path:
    return base_dir_factory("llama_bias")


@pytest.fixture(scope="session")
def llama_bf16_base_dir(base_dir_factory: Callable[[str], Path]) -> Path:
    return base_dir_factory("llama_bf16")


@pytest.fixture(scope="session")
def llama_sharded_base_dir(base_dir_factory: Callable[[str], Path]) -> Path:
    return base_dir_factory("llama_sharded")


@pytest.fixture(scope="session")
def gpt2_base_dir(base_dir_factory: Callable[[str], Path]) -> Path:
    return base_dir_factory("gpt2")


@pytest.fixture(scope="session")
def peft_case_factory(fixture_root: Path) -> Callable[[str], PeftCase]:
    cache: dict[str, PeftCase] = {}

    def get(kind: str) -> PeftCase:
        if kind not in cache:
            cache[kind] = build_peft_case(kind, fixture_root)
        return cache[kind]

    return get


@pytest.fixture(scope="session", params=PEFT_CASE_KINDS, ids=PEFT_CASE_KINDS)
def peft_case(request: pytest.FixtureRequest, peft_case_factory: Callable[[str], PeftCase]) -> PeftCase:
    return peft_case_factory(request.param)


@pytest.fixture(scope="session")
def llama_plain_case(peft_case_factory: Callable[[str], PeftCase]) -> PeftCase:
    return peft_case_factory("llama_plain")


@pytest.fixture(scope="session")
def sd_base_file(fixture_root: Path) -> Path:
    return build_sd_base(fixture_root)


@pytest.fixture(scope="session")
def kohya_case(fixture_root: Path) -> KohyaCase:
    return build_kohya_case(fixture_root)


@pytest.fixture(scope="session")
def diffusers_case_factory(fixture_root: Path) -> Callable[[str], DiffusersCase]:
    cache: dict[str, DiffusersCase] = {}

    def get(kind: str) -> DiffusersCase:
        if kind not in cache:
            cache[kind] = build_diffusers_case(kind, fixture_root)
        return cache[kind]

    return get


@pytest.fixture(scope="session", params=DIFFUSERS_CASE_KINDS, ids=DIFFUSERS_CASE_KINDS)
def diffusers_case(
    request: pytest.FixtureRequest, diffusers_case_factory: Callable[[str], DiffusersCase]
) -> DiffusersCase:
    return diffusers_case_factory(request.param)


@pytest.fixture(scope="session")
def diffusers_current_case(diffusers_case_factory: Callable[[str], DiffusersCase]) -> DiffusersCase:
    return diffusers_case_factory("diffusers_current")


@pytest.fixture(scope="session")
def diffusers_legacy_case(diffusers_case_factory: Callable[[str], DiffusersCase]) -> DiffusersCase:
    return diffusers_case_factory("diffusers_legacy")


@pytest.fixture(scope="session")
def malformed_files(fixture_root: Path) -> dict[str, Path]:
    return build_malformed_files(fixture_root)


@pytest.fixture(scope="session")
def pickle_marker(fixture_root: Path, malformed_files: dict[str, Path]) -> Path:
    return pickle_marker_path(fixture_root)


# --------------------------------------------------------------------------- LyCORIS (tests/lycoris_builders.py)

from lycoris_builders import LycorisCase, build_lycoris_case  # noqa: E402


@pytest.fixture(scope="session")
def lycoris_case_factory(fixture_root: Path) -> Callable[[str], LycorisCase]:
    """kind (lycoris_builders.LYCORIS_CASE_KINDS) -> lycoris_builders.LycorisCase, built once."""
    cache: dict[str, LycorisCase] = {}

    def get(kind: str) -> LycorisCase:
        if kind not in cache:
            cache[kind] = build_lycoris_case(kind, fixture_root)
        return cache[kind]

    return get
