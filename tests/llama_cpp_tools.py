"""llama.cpp as a test oracle: its own HF->GGUF converter and its `llama-export-lora` tool.

Where the sources come from
  The llama-cpp-python sdist from the package registry vendors a full llama.cpp tree
  under `vendor/llama.cpp` (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py,
  tools/export-lora). We fetch it with pip's ordinary client:
      pip download --no-deps --no-binary :all: llama-cpp-python==<version> -d DIR
  and pin the version (LLAMA_CPP_PYTHON_VERSION, overridable with the environment
  variable LORA_TOOLS_LLAMA_CPP_PYTHON_VERSION) so the cache path is known without
  asking the registry, and every run uses the same llama.cpp.

What is built
  Only the `llama-export-lora` target, Release, CPU backend only, static libraries, with
  no tests, examples, server, app, UI, OpenSSL or CURL (see CMAKE_OPTIONS), with Ninja
  and -j2. GGML_NATIVE is OFF so the binary does not depend on the build machine's CPU
  flags (the cache may outlive a machine); OpenMP is OFF (fewer runtime dependencies).

Cache
  ~/.cache/lora-tools-tests/llama.cpp-<version>/   (root overridable with
  LORA_TOOLS_TEST_CACHE)
      src/                    vendor/llama.cpp from the sdist
      build/                  the cmake build tree
      bin/llama-export-lora   the binary
      COMPLETE                written last; its presence means the rest is usable
  A file lock serialises concurrent builders (pytest -n, two sessions). A second run
  finds COMPLETE and does nothing.

Converter requirements
  The scripts put their own gguf-py first on sys.path (unless NO_LOCAL_GGUF is set), so
  they run the gguf they were written with; gguf-py needs numpy, tqdm, pyyaml and
  requests, all in the test environment. The scripts also need torch and transformers.
  convert_lora_to_gguf.py reads only the base's config.json. convert_hf_to_gguf.py also
  writes the vocabulary, so the base folder needs a tokenizer. For a Llama model
  (conversion/llama.py `LlamaModel.set_vocab`) it tries, in order: SentencePiece
  (tokenizer.model; needs the `sentencepiece` package, which is not a test dependency),
  then `_set_vocab_llama_hf` (gguf-py `LlamaHfVocab`: a tokenizer.json whose model is BPE
  with byte_fallback and whose decoder is a Sequence, i.e. the HF form of the Llama 2
  tokenizer, loaded through transformers' AutoTokenizer), then `_set_vocab_gpt2` (which
  identifies the pre-tokenizer by hashing a fixed text's tokens, and stops on a hash it
  does not know, i.e. any home-made tokenizer). We choose the middle one: the tests build
  a tiny Llama-2-style tokenizer.json with the `tokenizers` library (3 specials, the 256
  <0xNN> byte-fallback tokens, "\u2581" and a-z; see `write_tiny_llama_tokenizer`).
  One shim is needed to reach it without sentencepiece (see _RUNNER). The tokenizer
  only goes into the GGUF's metadata; no tensor depends on it, and llama-export-lora
  never tokenizes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = os.environ.get("LORA_TOOLS_LLAMA_CPP_PYTHON_VERSION", "0.3.36")
BUILD_JOBS = 2

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # static: the binary needs no libllama.so / libggml.so beside it
    "-DLLAMA_BUILD_COMMON=ON",  # export-lora links llama-common
    "-DLLAMA_BUILD_TOOLS=ON",  # tools/export-lora lives here; only its target is built
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",  # deprecated and ignored in recent llama.cpp; harmless, needed by older ones
    "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF",
    "-DGGML_BACKEND_DL=OFF",  # export-lora is only defined without dynamically loaded backends
    "-DGGML_CPU=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_BLAS=OFF",
    "-DGGML_RPC=OFF",
)
TARGET = "llama-export-lora"


class LlamaCppUnavailable(RuntimeError):
    """The llama.cpp sources could not be fetched, built or run."""


def cache_root() -> Path:
    root = os.environ.get("LORA_TOOLS_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lora-tools-tests"


def cache_dir() -> Path:
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def _tail(text: str | bytes | None, n: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:]


def _run(cmd: Sequence[str | os.PathLike[str]], what: str, *, cwd: Path | None = None, timeout: float = 3600, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise LlamaCppUnavailable(f"{what}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LlamaCppUnavailable(f"{what}: timed out after {timeout} s\n{_tail(exc.stdout)}\n{_tail(exc.stderr)}") from exc
    if proc.returncode != 0:
        raise LlamaCppUnavailable(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n--- stdout\n{_tail(proc.stdout)}\n--- stderr\n{_tail(proc.stderr)}")
    return proc.stdout + proc.stderr


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_sdist(dest: Path) -> Path:
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", dest], f"pip download {spec}", timeout=900)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise LlamaCppUnavailable(f"pip download {spec} left no sdist in {dest}: {os.listdir(dest)}")
    return found[0]


def _extract_vendor(sdist: Path, dest: Path) -> None:
    """Extract <top>/vendor/llama.cpp/** from the sdist into dest (prefix stripped)."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/")
            if len(parts) > 3 and parts[1:3] == ["vendor", "llama.cpp"]:
                m.name = "/".join(parts[3:])
                members.append(m)
        if not members:
            raise LlamaCppUnavailable(f"{sdist.name} has no vendor/llama.cpp tree")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)  # type: ignore[arg-type]
    for needed in ("CMakeLists.txt", "convert_hf_to_gguf.py", "gguf-py", "tools/export-lora/export-lora.cpp"):
        if not (dest / needed).exists():
            raise LlamaCppUnavailable(f"{sdist.name}: vendor/llama.cpp lacks {needed}")


def llama_cpp_dir() -> Path:
    """The vendored llama.cpp source tree (downloaded and extracted once)."""
    root = cache_dir()
    src = root / "src"
    marker = root / "SOURCES"
    if marker.is_file():
        return src
    with _locked(root.parent / f".{root.name}.lock"):
        if marker.is_file():
            return src
        with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as tmp:
            sdist = _download_sdist(Path(tmp))
            if src.exists():
                shutil.rmtree(src)
            staging = root / "src.partial"
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            _extract_vendor(sdist, staging)
            staging.rename(src)
        marker.write_text(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}\n")
    return src


def export_lora_binary() -> Path:
    """Path of a built `llama-export-lora` (built once, then cached)."""
    root = cache_dir()
    binary = root / "bin" / TARGET
    complete = root / "COMPLETE"
    if complete.is_file() and binary.is_file():
        return binary
    src = llama_cpp_dir()
    with _locked(root.parent / f".{root.name}.build.lock"):
        if complete.is_file() and binary.is_file():
            return binary
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                raise LlamaCppUnavailable(f"building {TARGET} needs `{tool}` on PATH")
        build = root / "build"
        started = time.monotonic()
        log = _run(["cmake", "-S", src, "-B", build, "-G", "Ninja", *CMAKE_OPTIONS], "cmake configure")
        log += _run(["cmake", "--build", build, "--target", TARGET, "-j", str(BUILD_JOBS)], f"cmake build {TARGET}")
        built = build / "bin" / TARGET
        if not built.is_file():
            raise LlamaCppUnavailable(f"the build finished but {built} does not exist\n{_tail(log)}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, binary)
        complete.write_text(f"built {TARGET} in {time.monotonic() - started:.0f} s with {' '.join(CMAKE_OPTIONS)}\n")
    return binary


# Runs llama.cpp's converter scripts, several in one interpreter (torch and transformers are
# imported once). argv[1] is a JSON list of [script, *args]; each runs as __main__ with
# that argv, from the llama.cpp tree, exactly as `python script args...` would, except
# for one shim: convert_hf_to_gguf's Llama vocab code imports sentencepiece before it
# checks for tokenizer.model, so without the package (not a test dependency) a base
# with only tokenizer.json never reaches its documented fallback (`_set_vocab_llama_hf`,
# gguf-py's LlamaHfVocab). When sentencepiece is missing and tokenizer.model is absent,
# the shim raises the FileNotFoundError the function would raise a line later.
_RUNNER = r"""
import importlib.util, json, os, runpy, sys
from pathlib import Path
jobs = json.loads(sys.argv[1])
root = Path(jobs[0][0]).resolve().parent
sys.path.insert(0, str(root))
if "NO_LOCAL_GGUF" not in os.environ:
    sys.path.insert(1, str(root / "gguf-py"))
if importlib.util.find_spec("sentencepiece") is None:
    import conversion.base as base
    original = base.TextModel._create_vocab_sentencepiece
    def _create_vocab_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return original(self)
    base.TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece
for script, *args in jobs:
    sys.argv = [script, *args]
    print(f"=== {' '.join(sys.argv)}", flush=True)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
"""


def run_converters(jobs: Sequence[Sequence[str | os.PathLike[str]]]) -> str:
    """Run llama.cpp converter scripts in one subprocess. Each job is
    [script name in the llama.cpp tree, *args], e.g. ["convert_hf_to_gguf.py", hf_dir,
    "--outfile", out, "--outtype", "f32"]. Returns the combined log; raises
    LlamaCppUnavailable when any fails."""
    import json

    src = llama_cpp_dir()
    argv = [[str(src / str(job[0])), *map(str, job[1:])] for job in jobs]
    for job in argv:
        if not Path(job[0]).is_file():
            raise LlamaCppUnavailable(f"no {job[0]} in the llama.cpp tree")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    return _run([sys.executable, "-c", _RUNNER, json.dumps(argv)], "llama.cpp converter", cwd=src, timeout=900, env=env)


def convert_hf_to_gguf_job(hf_dir: Path, out_gguf: Path, outtype: str = "f32") -> list[str | os.PathLike[str]]:
    return ["convert_hf_to_gguf.py", hf_dir, "--outfile", out_gguf, "--outtype", outtype]


def convert_lora_to_gguf_job(adapter_dir: Path, base_hf_dir: Path, out_gguf: Path, outtype: str = "f32") -> list[str | os.PathLike[str]]:
    return ["convert_lora_to_gguf.py", adapter_dir, "--base", base_hf_dir, "--outfile", out_gguf, "--outtype", outtype]


def convert_hf_to_gguf(hf_dir: Path, out_gguf: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own HF -> GGUF conversion of a model folder (needs a tokenizer: see the module doc)."""
    run_converters([convert_hf_to_gguf_job(hf_dir, out_gguf, outtype)])
    return out_gguf


def convert_lora_to_gguf(adapter_dir: Path, base_hf_dir: Path, out_gguf: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own PEFT -> GGUF LoRA conversion (reads only the base's config)."""
    run_converters([convert_lora_to_gguf_job(adapter_dir, base_hf_dir, out_gguf, outtype)])
    return out_gguf


def export_lora(base_gguf: Path, adapters: Sequence[Path | tuple[Path, float]], out_gguf: Path, *, threads: int = 2) -> str:
    """Run `llama-export-lora -m base --lora a [--lora-scaled b s] -o out`; returns its log."""
    cmd: list[str | os.PathLike[str]] = [export_lora_binary(), "-m", base_gguf, "-o", out_gguf, "-t", str(threads)]
    for item in adapters:
        if isinstance(item, tuple):
            cmd += ["--lora-scaled", f"{item[0]}:{item[1]!r}"]  # one argument, FNAME:SCALE
        else:
            cmd += ["--lora", item]
    return _run(cmd, TARGET, timeout=600)


def write_tiny_llama_tokenizer(model_dir: Path) -> int:
    """Write a tiny Llama-2-style tokenizer.json + tokenizer_config.json into model_dir
    (the form convert_hf_to_gguf's `_set_vocab_llama_hf` accepts, see the module doc);
    returns its vocabulary size, which the model's config.json vocab_size must match.
    Ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 <0x00>..<0xFF>, then "\u2581", a..z."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in ["\u2581", *map(chr, range(ord("a"), ord("z") + 1))]:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(specials)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return len(vocab)
