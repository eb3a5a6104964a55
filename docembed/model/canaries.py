"""Canaries: a fixed set of texts whose vectors prove that a worker computes the same numbers as the
workers that made an output.

The fingerprint compares settings, and ``numerics`` compares the device and precision a worker
claims; neither sees the numbers. A resume on another GPU type, a CPU image, a new torch, CUDA or
tokenizers build can make vectors that no longer match the ones already stored while every label
agrees. So every worker process embeds the canaries right after loading its model (``probe``), and
the first commit into an output pins them, with the numerics of the worker that made them, in
``_canaries.json`` (``UnitStore.check_canaries``). From then on a worker whose canary vectors fall
below ``--canary-threshold`` cosine to the pinned ones refuses to commit (``check``): the job fails,
naming its device, precision and library versions against the pinned ones. ``verify`` re-embeds
them in the current environment.

The texts cover what drifts: short and long inputs (the long one fills the window, so truncation and
position embeddings are exercised), several scripts (the tokenizer's normalisation and unknown-token
handling), code and numbers. They are embedded in padded batches, as documents are, so padding and
attention masking are exercised too; where the model fails on a batch, each is embedded alone and
those it still fails on are left out of the comparison.
"""

from __future__ import annotations

import socket

import numpy as np

from docembed.model import numerics
from docembed.vectors import pack, unpack
from docembed.errors import CanaryMismatch

THRESHOLD = 0.999

_LONG = (
    "The harbour town kept its lighthouse long after ships stopped needing it. Every evening the keeper "
    "climbed the one hundred and twelve steps, wound the clockwork that turned the lens, and wrote three "
    "lines in the log: the weather, the ships seen, and anything unusual. Most entries are dull. A gale "
    "in March, two trawlers and a ferry, nothing unusual. But the log runs for ninety years without a "
    "gap, and historians have read it for what it says about the town rather than the sea.\n\n"
    "In the early years the entries name the boats: herring drifters out of the north harbour, coal "
    "steamers bound for the capital, now and then a naval cutter. Later the names give way to counts, "
    "and the counts fall. The fishing fleet shrank as the herring moved offshore; the coal trade ended "
    "when the railway reached the valley; the ferry service was cut to twice a week and then to summer "
    "only. A reader who knows none of this history can still see it in the keeper's handwriting, which "
    "grows larger as there is less to write.\n\n"
    "The unusual things are the reason people read the log today. A whale stranded on the bar in 1911 "
    "and was towed off by six rowing boats. A balloon came down in the bay in 1923 and its two passengers "
    "were fished out, cold and embarrassed. During the war the lamp was dark for four years and the "
    "entries record only the weather, in a smaller hand, as though the keeper were whispering. When the "
    "light was automated the last keeper wrote a final line, not about the weather: that the lamp would "
    "go on turning without anyone to watch it, and that he hoped someone would still look up.\n\n"
    "The log is now kept in the town library. Visitors ask to see the last page more than any other, and "
    "the librarians have learned to open the book there before they are asked. Schoolchildren copy the "
    "weather entries into charts and find, to their surprise, that the winters have grown milder. "
    "Sailors who still use the harbour say the light matters less than it did, since every boat carries "
    "satellite positioning, but that they look for it all the same on the way home.\n\n"
    "Every few years someone proposes to digitise the log and put the original in a climate-controlled "
    "archive in the capital. The town has always refused. The book, the argument goes, belongs where the "
    "light can be seen from the reading-room window, and a page photographed is not a page turned. So the "
    "log stays on its lectern by the window, its spine repaired twice, its last line read aloud at the "
    "harbour festival each summer, when the lamp is lit by hand for one night in memory of the keepers."
)

# (name, text): names are how a mismatch is reported; texts never change once released (an output
# pins the texts it was made with, so a later set only adds to what is compared).
TEXTS: tuple[tuple[str, str], ...] = (
    ("word", "Yes."),
    ("sentence", "The quick brown fox jumps over the lazy dog."),
    ("question", "How do I reset my password if I no longer have access to my email account?"),
    ("paragraph", "Batch embedding jobs read documents from a data lake, split them into work units, and "
                  "write one vector per document. A job that is interrupted must resume where it stopped, "
                  "without losing or repeating any document."),
    ("german", "Die Straßenbahn fährt über die Brücke, während es draußen schneit und die Läden schließen."),
    ("french", "L'été dernier, nous avons visité une île où les habitants parlent encore un dialecte ancien."),
    ("russian", "Поезд отправляется с третьей платформы ровно в полночь, не опаздывайте."),
    ("greek", "Η βιβλιοθήκη ανοίγει στις εννέα το πρωί και κλείνει στις οκτώ το βράδυ."),
    ("arabic", "تفتح المكتبة أبوابها في التاسعة صباحا وتغلق في الثامنة مساء."),
    ("hindi", "पुस्तकालय सुबह नौ बजे खुलता है और रात आठ बजे बंद होता है।"),
    ("chinese", "图书馆早上九点开门，晚上八点关门。周末的开放时间可能不同。"),
    ("japanese", "図書館は朝九時に開き、夜八時に閉まります。週末は時間が変わることがあります。"),
    ("korean", "도서관은 오전 아홉 시에 문을 열고 오후 여덟 시에 닫습니다."),
    ("python", "def mean(values):\n    \"\"\"Arithmetic mean of a non-empty list.\"\"\"\n"
               "    return sum(values) / len(values)\n\nprint(mean([1, 2, 3.5]))"),
    ("sql", "SELECT customer_id, COUNT(*) AS orders, SUM(total) FROM orders WHERE created_at >= '2024-01-01' "
            "GROUP BY customer_id HAVING COUNT(*) > 3 ORDER BY 3 DESC LIMIT 10;"),
    ("numbers", "Invoice 2024-0117: 3 x 12.50 EUR, 1 x 7.99 EUR, VAT 19% = 8.65 EUR, total 54.14 EUR."),
    ("markup", "<p>See <a href=\"https://example.org/docs?page=2&amp;lang=en\">the docs</a> &mdash; "
               "section&nbsp;4.2.</p>"),
    ("emoji", "Great job team 🎉🚀 see you tomorrow 👋"),
    ("long", _LONG),
)


def probe(embedder, texts: dict[str, str] | None = None) -> dict:
    """This worker's canary record: ``{"texts": {name: text}, "vectors": {name: base64 float32 or
    None where the model failed on it}}``, from ``texts`` (default: the shipped set). Texts longer than
    half the window go in a batch of their own, so the short ones are not all padded to the window
    (one batch of the 19 takes 0.69 s on 2 CPU cores with MiniLM; two take 0.20 s)."""
    texts = dict(TEXTS) if texts is None else texts
    lengths = {n: len(ids) for n, ids in zip(texts, embedder.encode(list(texts.values())))}
    vectors = {}
    for group in ([n for n in texts if lengths[n] <= embedder.window_size // 2],
                  [n for n in texts if lengths[n] > embedder.window_size // 2]):
        vectors.update(_embed_group(embedder, group, texts))
    return {"texts": texts, "vectors": {n: pack(vectors[n]) for n in texts}}


def _embed_group(embedder, names: list[str], texts: dict[str, str]) -> dict:
    if not names:
        return {}
    try:
        return dict(zip(names, embedder.embed([texts[n] for n in names])))
    except Exception:  # noqa: BLE001 - a model that fails on the batch: each alone, and failures left out
        embedder.release_memory()
        return {n: _embed_one(embedder, texts[n]) for n in names}


def _embed_one(embedder, text: str) -> np.ndarray | None:
    try:
        return embedder.embed([text])[0]
    except Exception:  # noqa: BLE001 - this canary is not compared; the others are
        embedder.release_memory()
        return None


def cosines(pinned: dict, mine: dict) -> dict[str, float | None]:
    """Each pinned canary's cosine between the pinned vector and this worker's, for the canaries of
    the same text that the pinned record holds a finite vector for; None where this worker failed on
    it; -1 where this worker's vector holds NaN or inf (an overflow is the worst of drifts)."""
    found = {}
    for name, stored in pinned["vectors"].items():
        a = unpack(stored)
        if a is None or not np.isfinite(a).all() or mine["texts"].get(name) != pinned["texts"].get(name):
            continue
        b = unpack(mine["vectors"].get(name))
        if b is None or a.shape != b.shape:
            found[name] = None
        elif not np.isfinite(b).all():
            found[name] = -1.0
        else:
            found[name] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    return found


def pinnable(mine: dict) -> dict | None:
    """``mine`` as an output may pin it: vectors holding NaN or inf left out (None); None when no
    vector is left, since a pin that holds no vector could never check anything."""
    kept = {n: (v if v is not None and np.isfinite(unpack(v)).all() else None) for n, v in mine["vectors"].items()}
    return {**mine, "vectors": kept} if any(v is not None for v in kept.values()) else None


def check(pinned: dict, mine: dict, threshold: float) -> dict:
    """``{"checked": n, "min_cosine": c, "lowest": name, "failed": [...]}`` when every comparable
    canary is at least ``threshold`` (or ``threshold`` is -1: the check is off); raises CanaryMismatch
    otherwise, naming the worse canary, this worker's numerics and the pinned ones (``mine`` and
    ``pinned`` carry them under ``numerics``)."""
    result, problem = verdict(pinned, mine, threshold)
    if problem and threshold > -1:  # -1: the canaries are compared and recorded, never refused
        host = (mine.get("numerics") or {}).get("host") or socket.gethostname()
        raise CanaryMismatch(f"worker {host}: {problem}. It refuses to commit: run the workers in the environment "
                             "the output was made in (the same image, accelerator type and library versions), or "
                             "embed into a new --output")
    return result


def verdict(pinned: dict, mine: dict, threshold: float) -> tuple[dict, str | None]:
    """(the comparison, None) when ``mine`` reproduces the pinned canaries within ``threshold``;
    (the comparison, what is wrong, with both sides' numerics) otherwise."""
    found = cosines(pinned, mine)
    failed = sorted(n for n, c in found.items() if c is None)
    scored = {n: c for n, c in found.items() if c is not None}
    if not scored:
        what = ("the model embedded none of the output's canary texts, so its numbers cannot be checked"
                + (f" (the model failed on {', '.join(failed)})" if failed else ""))
        return {"checked": 0, "failed": failed}, _with_numerics(what, pinned, mine)
    lowest = min(scored, key=scored.get)
    result = {"checked": len(scored), "min_cosine": scored[lowest], "lowest": lowest, "failed": failed}
    if scored[lowest] >= threshold:
        return result, None
    below = sum(c < threshold for c in scored.values())
    what = (f"the canary texts' vectors differ from the output's: cosine {scored[lowest]:.6f} for '{lowest}' "
            f"({below} of {len(scored)} below --canary-threshold {threshold})")
    return result, _with_numerics(what, pinned, mine)


def _with_numerics(what: str, pinned: dict, mine: dict) -> str:
    worker, made = mine.get("numerics") or {}, pinned.get("numerics") or {}
    changed = differences(made, worker)
    return (f"{what}. Made here at {numerics.describe_numerics(worker)}; the output's were made at "
            f"{numerics.describe_numerics(made)}; "
            + (f"what differs: {'; '.join(changed)}" if changed else
               "none of device, precision, hardware or library versions differ, so the model's files or the "
               "machine's arithmetic do"))


def differences(made: dict, worker: dict) -> list[str]:
    """What differs between two numerics records: device, precision, hardware and library versions."""
    changed = [f"{key} {made.get(key)} -> {worker.get(key)}" for key in ("device", "precision", "gpu", "cpu", "cuda")
               if made.get(key) != worker.get(key) and (made.get(key) or worker.get(key))]
    before, after = made.get("libraries") or {}, worker.get("libraries") or {}
    changed += [f"{name} {before.get(name)} -> {after.get(name)}" for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)]
    return changed
