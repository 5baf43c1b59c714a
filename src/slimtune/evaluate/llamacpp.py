"""Run a GGUF file in a real llama.cpp, to check what `export_gguf` wrote: perplexity on the same
windows slimtune scores, and prompt / generation speed.

llama.cpp comes from the `xllamacpp` wheel (prebuilt llama.cpp with its C++ server, no compiler
needed): `pip install xllamacpp` or `pip install 'slimtune[llamacpp]'`. The server runs inside this
process and listens on the loopback address only.

Perplexity. llama.cpp's server does not return the log-probabilities of prompt tokens, so each
window goes through its `/embeddings` endpoint with pooling "none": llama.cpp runs the whole
decoder (every layer, at the file's own tensor types, with its own kernels) and returns the hidden
state after the final norm for every position. The last step, hidden @ output.weightᵀ and the
cross entropy, is done here in float32 with the GGUF's own output matrix, de-quantised exactly
(`gguf.quants.dequantize`). So the figure tests llama.cpp's reading of the architecture, the
per-layer shapes and the block types; it differs from `llama-perplexity` only in that last matmul
(llama.cpp would quantise the activations to 8 bits for it).
"""

from __future__ import annotations

import json
import os
import statistics
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SlimtuneError

INSTALL_HINT = "pip install xllamacpp (prebuilt llama.cpp), or pip install 'slimtune[llamacpp]'"


def require_llamacpp():
    """The xllamacpp module, or a one-line error saying how to install it."""
    try:
        import xllamacpp
    except ImportError:
        raise SlimtuneError(f"checking a GGUF in llama.cpp needs llama.cpp's Python build, which is not installed; {INSTALL_HINT}") from None
    return xllamacpp


def _check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"GGUF file {path} does not exist; export one first (slimtune prune --export gguf)")
    return path


class LlamaCppServer:
    """llama.cpp's server for one GGUF file, in this process; a context manager that stops it."""

    def __init__(self, path, n_ctx: int, threads: int | None = None, embedding: bool = False):
        xlc = require_llamacpp()
        path = _check_file(path)
        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or os.cpu_count() or 1
        params.warmup = False
        params.verbosity = -1
        if embedding:
            params.embedding = True
            params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        try:
            self._server = xlc.Server(params)
        except Exception as exc:  # llama.cpp refuses the file: say which and why in one line
            raise SlimtuneError(f"llama.cpp could not load {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.address = self._server.listening_address.rstrip("/")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if getattr(self, "_server", None) is not None:
            del self._server
            self._server = None

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens), hidden]: the final-norm output at every position (pooling none)."""
        body = json.dumps({"content": [int(t) for t in tokens]}).encode()
        req = urllib.request.Request(self.address + "/embeddings", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            out = json.loads(resp.read())
        return np.asarray(out[0]["embedding"], dtype=np.float32)

    def complete(self, tokens: list[int], n_predict: int) -> dict:
        """Greedy generation of exactly `n_predict` tokens after `tokens`; returns llama.cpp's timings."""
        out = self._server.handle_completions({"prompt": [int(t) for t in tokens], "n_predict": n_predict, "temperature": 0.0,
                                               "ignore_eos": True, "cache_prompt": False})
        if "error" in out:
            raise SlimtuneError(f"llama.cpp generation failed: {out['error'].get('message', out['error'])}")
        return out["timings"]


def _output_tensor(path):
    """The GGUF's output projection tensor (the embedding when they are tied) and its [vocab, hidden] shape."""
    import gguf

    reader = gguf.GGUFReader(_check_file(path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None:
        raise SlimtuneError(f"{path} has neither output.weight nor token_embd.weight; is it a language model GGUF?")
    return t, tuple(int(x) for x in reversed(t.shape.tolist()))


def output_matrix(path) -> torch.Tensor:
    """The GGUF's output projection [vocab, hidden] in float32 (the embedding when they are tied)."""
    import gguf

    t, shape = _output_tensor(path)
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def llamacpp_perplexity(path, tokens: torch.Tensor, threads: int | None = None, progress: bool = True) -> dict:
    """exp(mean next-token cross entropy) of the GGUF at `path`, run by llama.cpp, over the same
    [windows, L] token tensor and the same convention as `slimtune.evaluate.perplexity`."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise SlimtuneError("llamacpp_perplexity needs a [windows, seq_len>=2] token tensor; pack the text into windows first")
    head = output_matrix(path)
    n, seq_len = tokens.shape
    total = 0.0
    count = 0
    with LlamaCppServer(path, n_ctx=seq_len, threads=threads, embedding=True) as server:
        for row in tqdm(tokens, desc="llama.cpp perplexity", unit="win", disable=not progress):
            hidden = torch.from_numpy(server.hidden_states(row.tolist()))
            if hidden.shape != (seq_len, head.shape[1]):
                raise SlimtuneError(f"llama.cpp returned hidden states of shape {tuple(hidden.shape)}, expected ({seq_len}, {head.shape[1]})")
            logits = hidden[:-1] @ head.T
            total += float(F.cross_entropy(logits, row[1:].long(), reduction="sum"))
            count += seq_len - 1
    nll = total / count
    return {"perplexity": float(np.exp(nll)), "nll": nll, "tokens": count, "windows": n, "seq_len": seq_len}


def llamacpp_speed(path, prompt_tokens: int = 256, new_tokens: int = 64, repeats: int = 3, threads: int | None = None) -> dict:
    """Median prompt-processing and generation tokens/s of llama.cpp on this machine (greedy, no
    prompt cache, end-of-sequence ignored so every run generates `new_tokens`)."""
    vocab = _output_tensor(path)[1][0]  # the shape only: no need to de-quantise the matrix
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = []
    with LlamaCppServer(path, n_ctx=prompt_tokens + new_tokens, threads=threads) as server:
        server.complete(prompt[:8], 2)  # warm-up
        for _ in range(repeats):
            runs.append(server.complete(prompt, new_tokens))
    return {"prompt_tokens_per_s": statistics.median(r["prompt_per_second"] for r in runs),
            "gen_tokens_per_s": statistics.median(r["predicted_per_second"] for r in runs),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
            "threads": threads or os.cpu_count()}
