"""The HTML report: threshold table semantics, histogram SVG, and the page in a real browser.

Browser tests render the report with headless Chromium (Debian's ``chromium`` package) and
check the post-JavaScript DOM and a screenshot; they are skipped, with the reason, only
where no Chromium binary is installed.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, photo
from PIL import Image, ImageStat

from dedup_index import dedup_embeddings
from dedup_index.report import DEFAULT_THRESHOLDS, threshold_table, write_report
from dedup_index.report.groups import duplicate_groups
from dedup_index.report.histogram import histogram_svg

# ---------------------------------------------------------------------------------------
# helpers: synthetic embeddings, a headless browser, visible text of a DOM


def planted(n_base: int, n_dup: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Random unit rows plus noisy copies of some of them, the noise spread so that copy
    similarities run from about 0.75 to 1 (every threshold of the table matters)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.integers(0, n_base, n_dup)
    noise = rng.standard_normal((n_dup, dim))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    eps = rng.uniform(0.0, 0.9, n_dup)[:, None]
    copies = base[src] + eps * noise
    rows = np.concatenate([base, copies])
    return rows[rng.permutation(rows.shape[0])].astype(np.float32)


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no Chromium binary on PATH (chromium, chromium-browser, google-chrome): install "
        "Debian's 'chromium' package to run the browser tests (.ci/run does)"
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Run headless Chromium on a file URL: ``browser(url, dump_dom=True)`` returns the
    rendered DOM, ``browser(url, screenshot=png)`` writes a 1280x2000 screenshot."""
    binary = chromium_binary()
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(url: str, *, screenshot: Path | None = None) -> str:
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1280,2000",
            "--virtual-time-budget=5000",
        ]
        args.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
        done = subprocess.run(
            [*args, url], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


class _Visible(HTMLParser):
    """Text outside script/style/noscript, and elements by id / class, from a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.stack: list[str] = []
        self.hidden = 0
        self.imgs: list[dict] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
            return
        if tag in ("br", "input", "meta", "link", "hr"):
            return
        self.stack.append(tag)
        if tag in ("script", "style", "noscript", "title"):
            self.hidden += 1

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack:
                top = self.stack.pop()
                if top in ("script", "style", "noscript", "title"):
                    self.hidden -= 1
                if top == tag:
                    break

    def handle_data(self, data):
        if not self.hidden and data.strip():
            self.text.append(data.strip())


def visible(dom: str) -> _Visible:
    parser = _Visible()
    parser.feed(dom)
    return parser


def section(dom: str, sid: str) -> str:
    """The markup of ``<section id=sid>`` (sections are not nested)."""
    m = re.search(rf'<section id="{sid}">(.*?)</section>', dom, re.S)
    assert m, f"no section {sid!r} in the DOM"
    return m.group(1)


def text_of(markup: str) -> str:
    return " ".join(visible(markup).text)


def embedded_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert m
    return json.loads(m.group(1))


def assert_offline(html: str) -> None:
    """No external reference at all: nothing fetched from a URL, no @import or url()."""
    assert not re.search(r"https?://", html), re.search(r".{80}https?://.{80}", html)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?!data:|#)[a-z]+:", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert "<link" not in html.lower()


# ---------------------------------------------------------------------------------------
# threshold table: what each backend and policy allows, checked against re-running


@pytest.fixture(scope="module")
def planted_rows() -> np.ndarray:
    return planted(1500, 700, dim=24, seed=3)


def rerun_removed(E: np.ndarray, t: float, policy: str) -> int:
    return dedup_embeddings(E, t, backend="blocked", policy=policy).n_removed


def test_threshold_table_is_exact_at_every_threshold_with_blocked(planted_rows):
    result = dedup_embeddings(planted_rows, 0.9, backend="blocked")
    table = threshold_table(result)
    assert list(table["threshold"]) == list(DEFAULT_THRESHOLDS)
    assert (table["status"] == "exact").all()
    assert table.loc[table["is_run_threshold"], "removed"].item() == result.n_removed
    assert (table["removed"] + table["kept"] == result.n).all()
    # counts fall as the threshold rises, and actually vary over the table
    assert np.all(np.diff(table["removed"].to_numpy(dtype=int)) <= 0)
    assert table["removed"].iloc[0] > table["removed"].iloc[-1]
    for t in (0.8, 0.85, 0.93, 0.99):
        row = table[table["threshold"] == t]
        assert row["removed"].item() == rerun_removed(planted_rows, t, "reference"), t


def test_threshold_table_from_pairs_only_is_exact_above_and_a_bound_below(planted_rows):
    flat = dedup_embeddings(planted_rows, 0.9, backend="flat")
    assert flat.max_earlier_similarity is None
    blocked = threshold_table(dedup_embeddings(planted_rows, 0.9, backend="blocked"))
    table = threshold_table(flat)
    above = table["threshold"] >= 0.9
    assert (table.loc[above, "status"] == "exact").all()
    assert table.loc[above, "removed"].tolist() == blocked.loc[above, "removed"].tolist()
    below = table[~above]
    assert (below["status"] == "lower bound").all()
    assert (below["removed"] == flat.n_removed).all()
    assert (below["removed"] <= blocked.loc[~above, "removed"]).all()
    assert below["note"].str.contains("keeps no scores below the run's threshold 0.9").all()


@pytest.mark.parametrize("policy", ["greedy", "component"])
def test_threshold_table_for_other_policies(planted_rows, policy):
    result = dedup_embeddings(planted_rows, 0.88, backend="blocked", policy=policy)
    table = threshold_table(result, (0.8, 0.85, 0.88, 0.9, 0.95, 0.99))
    for row in table.itertuples():
        if row.threshold >= 0.88:
            assert row.status == "exact"
            assert row.removed == rerun_removed(planted_rows, row.threshold, policy)
        elif policy == "component":
            assert row.status == "lower bound" and row.removed == result.n_removed
            assert row.removed <= rerun_removed(planted_rows, row.threshold, policy)
        else:
            assert row.status == "unavailable"
            assert row.removed is pd_na() and row.kept is pd_na()
            assert "not monotone" in row.note


def pd_na():
    import pandas as pd

    return pd.NA


def test_threshold_table_marks_an_approximate_run(planted_rows):
    result = dedup_embeddings(
        planted_rows, 0.9, backend="ivf", backend_options={"nlist": 16, "nprobe": 2}
    )
    assert not result.exact
    table = threshold_table(result)
    assert (table["status"] == "lower bound").all()
    above = table["threshold"] >= 0.9
    assert table.loc[above, "note"].str.contains("pairs may be missing").all()
    assert table.loc[~above, "note"].str.contains("keeps no scores below").all()


def test_threshold_table_reads_pairs_spilled_to_disk(planted_rows, tmp_path):
    kw = dict(backend="blocked", policy="greedy")
    spilled = dedup_embeddings(
        planted_rows, 0.88, pairs_memory_budget=1, pairs_path=tmp_path / "p.parquet", **kw
    )
    assert not hasattr(spilled.pairs, "i")  # a PairFile, read in chunks
    in_memory = dedup_embeddings(planted_rows, 0.88, **kw)
    a, b = threshold_table(spilled), threshold_table(in_memory)
    assert a["removed"].astype(str).tolist() == b["removed"].astype(str).tolist()
    assert a["status"].tolist() == b["status"].tolist()


@pytest.mark.parametrize(
    ("backend", "policy", "marks"),
    [
        ("flat", "reference", ["≥ ", "lower bound", "keeps no scores below"]),
        ("blocked", "greedy", ["—", "unavailable", "not monotone"]),
        ("blocked", "component", ["≥ ", "lower bound", "were not collected"]),
    ],
)
def test_report_threshold_section_says_what_is_not_known(
    planted_rows, tmp_path, backend, policy, marks
):
    result = dedup_embeddings(planted_rows, 0.9, backend=backend, policy=policy)
    out = write_report(tmp_path / "r.html", result=result, keys=[str(k) for k in range(2200)])
    text = text_of(section(out.read_text(encoding="utf-8"), "thresholds"))
    for mark in marks:
        assert mark in text, mark
    assert f"0.90 (this run) {result.n_removed} {result.n - result.n_removed}" in text


def test_threshold_table_validates_thresholds(planted_rows):
    result = dedup_embeddings(planted_rows[:50], 0.9, backend="blocked")
    with pytest.raises(ValueError, match=r"each threshold must be in \[0, 1\].*1\.5"):
        threshold_table(result, (0.9, 1.5))
    with pytest.raises(ValueError, match="at least one"):
        threshold_table(result, ())


# ---------------------------------------------------------------------------------------
# histogram and groups, without a browser


def test_histogram_svg_counts_every_row_and_marks_the_threshold():
    values = np.array([0.2, 0.55, 0.91, 0.95, 0.99, 1.0, 1.0000001, np.nan])
    svg = histogram_svg(values, 0.9)
    root = ET.fromstring(svg)
    assert root.get("data-total") == "7" and root.get("data-nonfinite") == "1"
    titles = [t.text for t in root.iter("title")]
    assert sum(int(re.search(r": (\d+) row", t).group(1)) for t in titles) == 7
    line = next(e for e in root.iter("line") if e.get("class") == "threshold")
    xticks = {e.text: float(e.get("x")) for e in root.iter("text") if e.get("class") == "xtick"}
    assert float(line.get("x1")) == pytest.approx(xticks["0.9"], abs=0.1)
    labels = [e.text for e in root.iter("text")]
    assert "threshold 0.9" in labels and "nearest-neighbour cosine similarity" in labels
    assert "rows" in labels and "0.2" in xticks and "1.0" in xticks


def test_groups_are_sorted_by_similarity_and_cover_every_removed_row(planted_rows):
    result = dedup_embeddings(planted_rows, 0.85, backend="blocked")
    groups = duplicate_groups(result)
    assert np.array_equal(np.sort(groups.member), result.removed)
    assert np.all(np.diff(groups.best) <= 0)
    for g in range(len(groups)):
        sl = groups.members(g)
        assert np.all(result.group[groups.member[sl]] == groups.rep[g])
        assert result.keep[groups.rep[g]]
        assert groups.best[g] == groups.similarity[sl].max()


# ---------------------------------------------------------------------------------------
# real photos, a real model, a real browser

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "motorcycle", "coins"]


@pytest.fixture(scope="module")
def photo_rows(tmp_path_factory):
    """Image files of real photos with planted copies, plus one corrupt file; loaded the
    way the CLI loads them: (keys, values, failures, images)."""
    from dedup_index.io import try_load_image

    folder = tmp_path_factory.mktemp("report-photos")
    files = {}
    for name in NAMES:
        files[f"{name}.jpg"] = jpeg_bytes(photo(name, max_side=256))
    astro = Image.open(io.BytesIO(files["astronaut.jpg"])).convert("RGB")
    files["copies/astronaut_copy.jpg"] = files["astronaut.jpg"]
    files["copies/astronaut_q40.jpg"] = jpeg_bytes(astro, quality=40)
    files["copies/astronaut_small.jpg"] = jpeg_bytes(astro.resize((160, 160)))
    coffee = Image.open(io.BytesIO(files["coffee.jpg"])).convert("RGB")
    files["copies/coffee_q50.jpg"] = jpeg_bytes(coffee, quality=50)
    files["broken.jpg"] = files["rocket.jpg"][:300]
    (folder / "copies").mkdir()
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    keys, values, images, failures = [], [], [], []
    for rel in sorted(files):
        img, failure = try_load_image(rel, image_root=folder)
        if img is None:
            failures.append((rel, f"{failure.reason}: {failure.message}"))
        else:
            keys.append(rel)
            values.append(rel)
            images.append(img)
    return folder, keys, values, failures, images


@pytest.fixture(scope="module")
def photo_result(photo_rows):
    from dedup_index.encode import load_encoder

    _, _, _, _, images = photo_rows
    encoder = load_encoder("efficientnet-lite0", device="cpu", batch_size=8)
    return dedup_embeddings(encoder.encode(images), 0.9, backend="blocked")


def test_report_of_real_photos_renders_in_chromium(photo_rows, photo_result, browser, tmp_path):
    folder, keys, values, failures, _ = photo_rows
    result = photo_result
    removed_keys = {keys[j] for j in result.removed}
    assert {"copies/astronaut_copy.jpg", "copies/astronaut_q40.jpg"} <= removed_keys
    assert "coffee.jpg" not in removed_keys and len(failures) == 1

    out = write_report(
        tmp_path / "report.html",
        result=result,
        keys=keys,
        values=values,
        failures=failures,
        image_root=folder,
        title="Photos report",
        extra_summary={"model": "efficientnet-lite0"},
    )
    html = out.read_text(encoding="utf-8")
    assert_offline(html)
    data = embedded_data(html)
    n_groups = len(duplicate_groups(result))
    assert len(data["g"]) == n_groups >= 1

    dom = browser(out.as_uri())
    page = visible(dom)
    summary = text_of(section(dom, "summary"))
    for label, value in [
        ("rows in", len(keys) + 1),
        ("images loaded", len(keys)),
        ("failed to load", 1),
        ("kept", result.n - result.n_removed),
        ("removed as near-duplicates", result.n_removed),
        ("duplicate groups", n_groups),
        ("threshold", "0.9"),
        ("model", "efficientnet-lite0"),
    ]:
        assert f"{label} {value}" in summary, (label, value, summary)
    # threshold table: one row per threshold, counts as threshold_table computes them
    table = threshold_table(result)
    thresholds = text_of(section(dom, "thresholds"))
    for row in table.itertuples():
        cell = f"{row.threshold:.2f}" + (" (this run)" if row.threshold == 0.9 else "")
        assert f"{cell} {row.removed} {row.kept} {row.removed_pct:.1f} % exact" in thresholds
    # the histogram is in the page, with its threshold label
    assert "threshold 0.9" in text_of(section(dom, "histogram"))
    # groups rendered by the script: page text, keys, roles, scores, thumbnails
    groups = text_of(section(dom, "groups"))
    assert "page 1 of 1 (groups 1–" in groups
    assert "astronaut.jpg kept" in groups.replace("kept astronaut.jpg", "astronaut.jpg kept")
    for key in removed_keys:
        assert key in groups
    assert re.search(r"similarity (0\.9\d{3}|1\.0000)", groups)
    thumbs = [i for i in page.imgs if i.get("src", "").startswith("data:image/jpeg;base64,")]
    assert len(thumbs) == result.n_removed + n_groups  # every shown row has a thumbnail
    kept_keys = {keys[g] for g in set(result.group[result.removed])}
    assert {i["alt"] for i in thumbs} == removed_keys | kept_keys
    # the failure is listed with its reason
    failed = text_of(section(dom, "failures"))
    assert "broken.jpg" in failed and "truncated" in failed
    assert "Photos report" in " ".join(page.text)

    shot = tmp_path / "report.png"
    browser(out.as_uri(), screenshot=shot)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    stat = ImageStat.Stat(img)
    assert max(stat.stddev) > 20, stat.stddev  # not a blank page
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 150) & (pixels[:, 1] < 90) & (pixels[:, 2] < 90)
    assert red.sum() > 200  # the threshold line and the bars at or above it


def test_many_groups_stay_small_and_paginate_in_chromium(browser, tmp_path):
    E = planted(12000, 8000, dim=32, seed=1)  # 20k rows
    result = dedup_embeddings(E, 0.85, backend="blocked")
    keys = [f"shard{r // 1000:02d}/img_{r:05d}.jpg" for r in range(result.n)]
    odd = int(result.removed[0])
    keys[odd] = "<b>bold</b></script><script>boom()</script>&amp;.jpg"
    groups = duplicate_groups(result)
    n_groups = len(groups)
    assert n_groups > 3000
    out = write_report(tmp_path / "big.html", result=result, keys=keys, page_size=50)
    html = out.read_text(encoding="utf-8")
    assert out.stat().st_size < 1_500_000, out.stat().st_size
    assert_offline(html)
    assert "<b>bold" not in html and "boom()</script>" not in html
    pages = -(-n_groups // 50)

    dom = browser(out.as_uri() + "#page=2")
    text = text_of(section(dom, "groups"))
    assert f"page 2 of {pages} (groups 51–100 of {n_groups})" in text
    assert dom.count('class="group"') == 50  # one page of DOM, not thousands of groups
    page2 = [keys[int(r)] for r in groups.rep[50:100]]
    page1 = [keys[int(r)] for r in groups.rep[:50]]
    assert all(k in text for k in page2)
    assert not any(k in text for k in page1)
    assert f"Group 51 of {n_groups}" in text and "Group 50 of" not in text
    assert "No image values were given" in text

    last = browser(out.as_uri() + "#page=999999")  # clamped to the last page
    text = text_of(section(last, "groups"))
    first = (pages - 1) * 50 + 1
    assert f"page {pages} of {pages} (groups {first}–{n_groups} of {n_groups})" in text
    assert last.count('class="group"') == n_groups - first + 1

    # the hostile key is shown as text, never parsed as markup
    g = int(np.flatnonzero(np.isin(groups.rep, result.group[odd]))[0])
    odd_dom = browser(out.as_uri() + f"#page={g // 50 + 1}")
    assert "<b>bold</b></script><script>boom()</script>&amp;.jpg" in text_of(odd_dom)
    assert "<b>" not in section(odd_dom, "groups")


def test_thumbnails_are_capped_and_the_page_says_so(photo_rows, photo_result, tmp_path):
    folder, keys, values, _, _ = photo_rows
    result = photo_result
    n_groups = len(duplicate_groups(result))
    out = write_report(
        tmp_path / "r.html",
        result=result,
        keys=keys,
        values=values,
        image_root=folder,
        max_thumbnails=1,
        thumb_px=32,
    )
    html = out.read_text(encoding="utf-8")
    data = embedded_data(html)
    assert len(data["t"]) == 1
    thumb = Image.open(io.BytesIO(__import__("base64").b64decode(next(iter(data["t"].values())))))
    assert max(thumb.size) <= 32
    if n_groups > 1:
        assert f"for the first 0 of {n_groups} groups only" in html
    assert "max_thumbnails=1" in html


def test_write_report_validates_its_arguments(photo_result, tmp_path):
    keys = [str(k) for k in range(photo_result.n)]
    with pytest.raises(ValueError, match=r"one key per row of result \(\d+\); got 2"):
        write_report(tmp_path / "x.html", result=photo_result, keys=keys[:2])
    with pytest.raises(ValueError, match=r"page_size must be an integer in \[1, 1000\], got 0"):
        write_report(tmp_path / "x.html", result=photo_result, keys=keys, page_size=0)
    with pytest.raises(ValueError, match=r"thumb_px must be an integer in \[16, 512\], got 4"):
        write_report(tmp_path / "x.html", result=photo_result, keys=keys, thumb_px=4)
    with pytest.raises(ValueError, match="values must hold one image value per row"):
        write_report(tmp_path / "x.html", result=photo_result, keys=keys, values=["a"])
    assert not (tmp_path / "x.html").exists()


def test_import_report_does_not_import_torch():
    code = (
        "import sys, dedup_index.report; "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    done = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


# ---------------------------------------------------------------------------------------
# verification: the candidates it rejected and the pairs it confirmed, with the evidence


def test_report_shows_rejected_and_verified_candidates(encoder, tmp_path):
    """Real tiles and edited copies, the tiny real CLIP at threshold 0 (every pair is a
    candidate), real verification; one file is gone before verification (not verifiable)
    and one has markup in its name (escaped, never a tag)."""
    pytest.importorskip("cv2")
    from test_verify import EDITS

    from dedup_index.report.verification import verification_section
    from dedup_index.verify import verify_result

    img = photo("astronaut", max_side=512)
    h, w = img.height // 2, img.width // 2
    a, b = img.crop((0, 0, w, h)), img.crop((w, h, 2 * w, 2 * h))
    evil = "b <img src=x onerror=alert(1)>.png"
    files = {
        "a.png": a,
        "b.png": b,
        "a_hflip.png": EDITS["hflip"](a),
        evil: EDITS["caption"](b),
        "gone.png": EDITS["blur"](a),
    }
    for name, im in files.items():
        im.save(tmp_path / name)
    keys = list(files)
    result = dedup_embeddings(encoder.encode(list(files.values())), 0.0, backend="blocked")
    (tmp_path / "gone.png").unlink()
    result = verify_result(result, keys, image_root=tmp_path, num_workers=0)
    v = result.info["verification"]
    assert v.counts["candidates"] == 10 and v.counts["verified"] == 2
    assert v.counts["unverifiable"] == 4 and v.counts["rejected"] == 4

    out = write_report(
        tmp_path / "report.html",
        result=result,
        keys=keys,
        values=keys,
        image_root=tmp_path,
        rows=[10, 11, 12, 13, 14],
    )
    html = out.read_text(encoding="utf-8")
    assert_offline(html)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    part = section(html, "verification")
    text = text_of(part)
    assert "Candidates verification did not confirm (8)" in text
    assert "Verified pairs (2)" in text
    rows = re.findall(r"<tr>(<td.*?)</tr>", part, re.S)
    assert len(rows) == 10  # every candidate listed: under the cap
    rejected = [r for r in rows if "<td>rejected</td>" in r]
    assert len(rejected) == 4 and all("RANSAC inliers" in r for r in rejected)
    gone = [r for r in rows if "gone.png" in r]
    assert len(gone) == 4 and all("not verifiable: load_error" in r for r in gone)
    verified = [r for r in rows if "a_hflip.png" in r and "a.png" in r]
    assert len(verified) == 1 and "(mirrored)" in verified[0]
    assert "row 12" in verified[0]  # input row numbers, not result rows
    # similarity, hash distance, inliers and matches of each listed pair are shown
    frame = v.to_frame()
    k = int(np.flatnonzero((frame.i == 0) & (frame.j == 2))[0])  # a, a_hflip
    cells = re.findall(r'<td class="num[^"]*">([^<]*)</td>', verified[0])
    assert cells[1:] == [
        str(frame.hash_distance[k]) if frame.hash_distance[k] >= 0 else "—",
        str(frame.inliers[k]) if frame.inliers[k] >= 0 else "—",
        str(frame.matches[k]) if frame.matches[k] >= 0 else "—",
    ]
    assert float(cells[0]) == pytest.approx(min(frame.similarity[k], 1.0), abs=1e-4)
    # both images of a pair have a thumbnail, except the file that is gone
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,', part)
    assert len(thumbs) == 2 * 10 - 4 and part.count("no thumbnail") == 4

    # capped, with a count of the rest; no thumbnails without image values
    capped = verification_section(v, keys, listed=3)
    assert "The first 3 are listed; 5 more are not." in capped
    assert "data:image" not in capped and "no thumbnail" not in capped


def test_report_without_verification_has_no_verification_section(
    photo_result, photo_rows, tmp_path
):
    _, keys, _, _, _ = photo_rows
    html = write_report(tmp_path / "r.html", result=photo_result, keys=keys).read_text()
    assert '<section id="verification">' not in html
