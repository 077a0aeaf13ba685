"""SmolLM2-135M through jaxquant's GGUF path against transformers' GGUF loading of the same file.

Both read ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the ``models`` extra) and run in float32
on the same token windows (jaxquant's tokenizer; its ids equal llama.cpp's, see
tests/test_real_model.py). Recorded: relative Frobenius difference of the logits on every
window, and the token perplexity of each over the same windows of the built-in
validation split and of the second corpus. Also recorded: how transformers' own GGUF
tokenizer differs (it joins digit runs that llama.cpp and the original SmolLM2 tokenizer
split), and the perplexity that tokenization gives.

    python benchmarks/real_model_parity.py   # -> results/real_model/parity.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.data import SECOND_CORPUS, eval_windows, load_tokenizer, read_text
from jaxquant.eval import perplexity
from jaxquant.known_models import resolve_model
from jaxquant.models import from_pretrained, functional

sys.path.insert(0, str(Path(__file__).parent))
from decode import versions  # noqa: E402  (one definition of the recorded package versions)

RESULTS = Path(__file__).parent / "results" / "real_model"


def _torch_nll(model, windows: np.ndarray) -> tuple[float, np.ndarray]:
    import torch  # noqa: PLC0415

    total, logits = 0.0, []
    with torch.no_grad():
        for w in windows:
            out = model(torch.tensor(w[None].astype(np.int64))).logits[0].double()
            logp = torch.log_softmax(out[:-1], dim=-1)
            total -= float(logp.gather(1, torch.tensor(w[1:, None].astype(np.int64))).sum())
            logits.append(out.float().numpy())
    return total, np.stack(logits)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default=str(RESULTS / "parity.json"))
    args = p.parse_args(argv)

    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    ours = from_pretrained(path)
    apply_fn, params = functional(ours)
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            dtype=torch.float32)
    ref.eval()
    texts = {"builtin validation": read_text("builtin", split="validation"), SECOND_CORPUS: read_text(SECOND_CORPUS)}
    report: dict = {"model": args.model, "path": path, "seqlen": args.seqlen, "texts": {}}
    for name, text in texts.items():
        windows = eval_windows(tok.encode(text), args.seqlen)[:11]
        t0 = time.perf_counter()
        ppl_ours = perplexity(apply_fn, params, windows.reshape(-1), args.seqlen, batch_size=1)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        nll, ref_logits = _torch_nll(ref, windows)
        t_ref = time.perf_counter() - t0
        ppl_ref = math.exp(nll / (len(windows) * (args.seqlen - 1)))
        our_logits = np.asarray(apply_fn(params, jnp.asarray(windows[:2])))
        rel = [float(np.linalg.norm(our_logits[i] - ref_logits[i]) / np.linalg.norm(ref_logits[i])) for i in range(2)]
        report["texts"][name] = {"windows": len(windows), "tokens_scored": len(windows) * (args.seqlen - 1),
                                 "ppl_jaxquant": ppl_ours, "ppl_transformers": ppl_ref,
                                 "ppl_rel_diff": abs(ppl_ours - ppl_ref) / ppl_ref,
                                 "logits_rel_frobenius_first_windows": rel,
                                 "seconds_jaxquant": round(t_ours, 2), "seconds_transformers": round(t_ref, 2)}
        print(f"{name}: jaxquant {ppl_ours:.4f}, transformers {ppl_ref:.4f} "
              f"(rel diff {abs(ppl_ours - ppl_ref) / ppl_ref:.2e}), logits rel {max(rel):.2e}")
    # transformers' own GGUF tokenizer, for the record: it merges digit runs.
    hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    val = texts["builtin validation"]
    hf_ids = hf_tok.encode(val, add_special_tokens=False)
    hf_windows = eval_windows(hf_ids, args.seqlen)
    ppl_hf_tok = perplexity(apply_fn, params, hf_windows.reshape(-1), args.seqlen, batch_size=1)
    report["transformers_gguf_tokenizer"] = {
        "tokens": len(hf_ids), "ours": len(tok.encode(val)), "same_ids": hf_ids == tok.encode(val),
        "windows": len(hf_windows), "ppl_jaxquant_model": ppl_hf_tok}
    print(f"transformers' GGUF tokenizer: {len(hf_ids)} tokens (ours {len(tok.encode(val))}), "
          f"perplexity {ppl_hf_tok:.4f} over {len(hf_windows)} windows")
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), **versions(("jaxlib", "torch",
                                                                                              "transformers", "gguf"))}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode("utf-8"))
    return report


if __name__ == "__main__":
    main()
