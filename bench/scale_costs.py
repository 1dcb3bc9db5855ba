"""The per-token costs docs/scale.md sizes big jobs from, measured on the embedded model on this machine.

1. Forward cost: tokens/s of a capture of every token at one site and at all 30 blocks' residual
   outputs, and the achieved FLOP rate (2 x parameters per token).
2. Bytes per captured site and token: a capture streamed to disk (safetensors shards) in float32 and in
   bfloat16, against the arithmetic ``d_model x bytes per value``; the ratio is the shards' overhead
   (headers, offsets). docs/scale.md multiplies that arithmetic out for 7B and 70B models.
3. Tokens per study setting: one behaviour's coefficient x layer sweep (cloze form, held-out items plus
   KL on neutral text), counting every token position that enters the model; divided by the number of
   (layer, coefficient) settings it is what one cell of a behaviour x layer x coefficient study costs.

    .venv/bin/python bench/scale_costs.py          # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repe import capture, load_model  # noqa: E402
from repe.datasets import load_neutral  # noqa: E402


def count_tokens(lm) -> tuple[list[int], object]:  # noqa: ANN001
    seen = [0]

    def pre(_m, args, kwargs):  # noqa: ANN001, ANN202
        h = args[0] if args else kwargs["hidden_states"]
        seen[0] += int(h.shape[0] * h.shape[1])

    return seen, lm.layers[0].register_forward_pre_hook(pre, with_kwargs=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    lm = load_model()
    n_params = sum(p.numel() for p in lm.model.parameters())
    texts = (load_neutral() * 4)[: args.texts]
    out: dict[str, float] = {"params": n_params, "d_model": lm.d_model, "n_layers": lm.n_layers}
    capture(lm, texts[:8], "blocks.12.hook_resid_post", positions="all", progress=False)  # warm
    from repe.batching import batches, encode

    enc = encode(lm.tokenizer, texts)
    real = sum(len(e.ids) for e in enc)
    for name, sites in (("one_site", "blocks.12.hook_resid_post"), ("all_blocks", None)):
        t0 = time.perf_counter()
        kw = {} if sites is None else {"sites": sites}
        capture(lm, texts, positions="all", progress=False, **kw)
        dt = time.perf_counter() - t0
        out[f"capture_{name}_tok_s"] = real / dt
        print(
            f"capture, every token, {name:10s}: {real} tokens in {dt:.2f} s = {real / dt:,.0f} tok/s"
        )
    # a plain forward pass of the whole model (LM head included) for the FLOP rate (padding included:
    # it is computed too)
    n_tok, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for _s, b in batches(enc, 16, lm.tokenizer.pad_token_id, "right"):
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            n_tok += int(b.input_ids.numel())
    dt = time.perf_counter() - t0
    out["forward_tok_s"] = n_tok / dt
    out["achieved_gflop_s"] = 2 * n_params * n_tok / dt / 1e9
    print(
        f"full forward: {n_tok / dt:,.0f} tok/s, {2 * n_params / 1e6:.0f} MFLOP/token, "
        f"{out['achieved_gflop_s']:.1f} GFLOP/s achieved"
    )
    # bytes per site and token on disk
    ratios = []
    for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        with tempfile.TemporaryDirectory() as tmp:
            seen, h = count_tokens(lm)
            sites = ["blocks.6.hook_resid_post", "blocks.12.hook_resid_post"]
            acts = capture(
                lm,
                texts,
                sites,
                positions="all",
                out_dir=Path(tmp) / "acts",
                store_dtype=dtype,
                progress=False,
            )
            h.remove()
            rows = int(acts.rows(sites[0])[0].shape[0])
            disk = sum(f.stat().st_size for f in (Path(tmp) / "acts").rglob("*") if f.is_file())
            per = disk / (rows * len(sites))
            ideal = lm.d_model * nbytes
            ratios.append(per / ideal)
            out[f"disk_bytes_per_site_token_{str(dtype).split('.')[1]}"] = per
            print(
                f"disk, {str(dtype):15s}: {disk:,} bytes for {rows} tokens x {len(sites)} sites "
                f"= {per:.0f} B per site-token; d_model x {nbytes} = {ideal} ({per / ideal:.3f}x)"
            )
    # tokens per (layer, coefficient) setting of a cloze sweep: a 1 x 1 and a 2 x 2 sweep give the
    # fixed part (the direction, coefficient 0, the unsteered KL reference) and the part per setting
    from steering.evaluation.sweep import coeff_layer_sweep

    measured = []
    for layers, coeffs in (([12], [0.2]), ([10, 14], [-0.2, 0.2])):
        seen, h = count_tokens(lm)
        t0 = time.perf_counter()
        coeff_layer_sweep(
            lm, "refusal", layers, coeffs, n_items=args.items, form="cloze", control=False
        )
        dt = time.perf_counter() - t0
        h.remove()
        measured.append((len(layers) * len(coeffs), seen[0], dt))
        print(
            f"cloze sweep, {args.items} held-out items, {len(layers)} layer(s) x {len(coeffs)} "
            f"coefficient(s): {seen[0]:,} token positions (padding included) in {dt:.1f} s"
        )
    (n1, t1, s1), (n4, t4, s4) = measured
    per_tok, per_s = (t4 - t1) / (n4 - n1), (s4 - s1) / (n4 - n1)
    out["sweep_tokens_per_setting"] = per_tok
    out["sweep_tokens_fixed"] = t1 - per_tok
    out["sweep_seconds_per_setting"] = per_s
    out["sweep_seconds_fixed"] = s1 - per_s
    out["sweep_items"] = args.items
    print(
        f"  => per (layer, coefficient) setting {per_tok:,.0f} token positions, {per_s:.1f} s; "
        f"fixed per behaviour {t1 - per_tok:,.0f} token positions, {s1 - per_s:.1f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    worst = max(ratios)
    print(
        f"RESULT capture_disk_bytes_vs_arithmetic {worst:.3f} target <= 1.05 "
        f"{'PASS' if worst <= 1.05 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
