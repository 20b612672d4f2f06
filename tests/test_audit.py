"""The label audit (issue 31) on real photos: planted label flips are found by out-of-fold probabilities, a copy
under another label is reported with its twin, and relabel/remove through the CLI and REST reach train and
evaluate."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.liveserver import chromium, serving

from image_similarity.entrypoints.cli import main
from image_similarity.entrypoints.web import create_app
from image_similarity.errors import BadInput
from image_similarity.pipeline.audit import at_cutoff, audit
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest, ingest_bytes
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.store import SQLiteStore

KEY = "audit-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, small_dir, featurizer) -> tuple[Path, dict[int, str], int]:
    """36 real photos, featurized and split, with the last dotted and leopard photo relabelled striped and a
    re-encoded copy of a leopard photo stored as dotted: (database, true labels of the flipped images, copy id)."""
    path = tmp_path_factory.mktemp("audit") / "planted.sqlite"
    with SQLiteStore(path) as store:
        ingest(store, small_dir, progress=False)
        images = store.images()
        flips = {[im for im in images if im.label == c][-1].id: c for c in ("dotted", "leopard")}
        for image_id in flips:
            assert store.relabel_image(image_id, "striped")
        source = [im for im in images if im.label == "leopard"][3]
        buffer = io.BytesIO()
        Image.open(io.BytesIO(store.image_bytes(source.id))).convert("RGB").save(buffer, "JPEG", quality=70)
        copy, reason = ingest_bytes(store, "dotted/copy.jpg", "dotted", buffer.getvalue())
        assert reason is None
        featurize(store, featurizer, progress=False)
        split(store, seed=0)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path, flips, copy


@pytest.fixture
def db(planted, tmp_path) -> Path:
    """A private copy of the planted database."""
    copy = tmp_path / "db.sqlite"
    shutil.copy(planted[0], copy)
    return copy


def test_audit_finds_planted_flips_and_the_copy_first(planted):
    path, flips, copy = planted
    with SQLiteStore(path) as store:
        report = audit(store)
    assert report.images == 37 and report.classes == {"dotted": 12, "leopard": 11, "striped": 14}
    found = {s.id: s for s in report.suspects}
    assert {*flips, copy} <= set(found) and report.suspects[0].id in {*flips, copy}
    for image_id, truth in flips.items():
        assert found[image_id].label == "striped" and found[image_id].suggested == truth
        assert found[image_id].probability >= report.cutoff > found[image_id].label_probability
    assert found[copy].suggested == "leopard" and "twin under another label" in found[copy].reasons
    assert [t.label for t in found[copy].twins] == ["leopard"]
    assert [[t.label for t in group] for group in report.conflicts] == [["leopard", "dotted"]]
    probabilities = [s.probability for s in report.suspects]
    assert probabilities == sorted(probabilities, reverse=True)


def test_small_classes_are_reported_not_judged(planted):
    with SQLiteStore(planted[0]) as store:
        report = audit(store, min_class_images=12)
    assert report.small_classes == {"leopard": 11}
    assert all(s.label != "leopard" and s.suggested != "leopard" for s in report.suspects
               if "twin under another label" not in s.reasons)


def test_cli_audit_json_table_and_sheet(planted, tmp_path, capsys):
    path, flips, copy = planted
    sheet = tmp_path / "sheet.png"
    assert main(["audit", "--db", str(path), "--json", "--sheet", str(sheet), "--top", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {*flips, copy} <= {s["id"] for s in report["suspects"]}
    assert {"label", "suggested", "probability", "label_probability", "reasons", "twins"} <= set(report["suspects"][0])
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > 600
    assert main(["audit", "--db", str(path), "--top", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "suspects at cut-off 0.5" in table[0] and "1 groups of near duplicates" in table[0]
    assert len([line for line in table if "  [disputed" in line]) == 2 and "more (--top" in table[-1]


def test_relabel_then_train_and_evaluate_use_the_new_label(db, capsys, tmp_path):
    with SQLiteStore(db) as store:
        subsets = store.split()
        test_image = next(im for im in store.images() if subsets[im.id] == "test" and im.label == "dotted")
    assert main(["relabel", str(test_image.id), "leopard", "--db", str(db)]) == 0
    assert capsys.readouterr().out.startswith(f"image {test_image.id}: dotted -> leopard")
    assert main(["train", "--db", str(db), "--C", "1"]) == 0
    assert main(["evaluate", "--db", str(db), "--json", "--out", str(tmp_path)]) == 0
    with SQLiteStore(db) as store:
        confusion = store.evaluation().confusion
        labels = {im.id: im.label for im in store.images()}
    test_counts = {true: sum(n for s, t, _, n in confusion if s == "test" and t == true)
                   for true in ("dotted", "leopard")}
    expected = {c: sum(1 for i, s in subsets.items() if s == "test" and labels[i] == c) for c in test_counts}
    assert test_counts == expected and labels[test_image.id] == "leopard"


def test_audit_apply_corrects_the_flips(db, planted, capsys):
    _, flips, copy = planted
    assert main(["audit", "--db", str(db), "--apply"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("relabelled") and int(out[-1].split()[1]) == len(out) - 3  # table rows
    with SQLiteStore(db) as store:
        labels = {im.id: im.label for im in store.images()}
    assert {i: labels[i] for i in flips} == flips and labels[copy] == "leopard"


def test_remove_takes_features_and_split(db, capsys, planted):
    copy = planted[2]
    assert main(["remove", str(copy), "--db", str(db)]) == 0
    with SQLiteStore(db) as store:
        assert copy not in {im.id for im in store.images()} and copy not in store.split()
        assert copy not in store.features("efficientnet_lite0")[0] and audit(store).conflicts == []


@pytest.mark.parametrize("argv, message", [
    (["relabel", "99999", "dotted"], "no image with id 99999"),
    (["relabel", "1", "tartan"], "unknown label 'tartan': use one of dotted, leopard, striped"),
    (["relabel", "1", "a/b", "--new-class"], "bad label 'a/b'"),
    (["remove", "99999"], "no image with id 99999"),
    (["audit", "--cutoff", "1.5"], "the cut-off is a probability"),
])
def test_bad_input_is_one_line(db, argv, message, capsys):
    assert main([*argv, "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_rest_audit_relabel_and_remove_need_the_key(db, featurizer, planted):
    _, flips, copy = planted
    with SQLiteStore(db) as store:
        train(store, C=[1.0])
        with TestClient(create_app(store, featurizer, api_key=KEY, featurize_added=False)) as client:
            report = client.get("/api/audit", params={"top": 2}).json()
            assert len(report["suspects"]) == 2 and report["total_suspects"] >= 3
            assert {*flips, copy} <= {s["id"] for s in client.get("/api/audit").json()["suspects"]}
            assert report["suspects"][0]["url"] == f"/api/images/{report['suspects'][0]['id']}"
            victim, truth = next(iter(flips.items()))
            path = f"/api/images/{victim}/label"
            assert client.put(path, json={"label": truth}).status_code == 401
            assert client.put(path, json={"label": truth}, headers={"Authorization": "Bearer wrong"}).status_code == 401
            bad = client.put(path, json={"label": "tartan"}, headers=AUTH)
            assert bad.status_code == 400 and "unknown label 'tartan'" in bad.json()["detail"]
            assert client.put("/api/images/99999/label", json={"label": truth}, headers=AUTH).status_code == 404
            done = client.put(path, json={"label": truth}, headers=AUTH)
            assert done.status_code == 200 and done.json() == {"id": victim, "label": truth, "previous": "striped"}
            assert client.delete(f"/api/images/{copy}").status_code == 401
            assert client.delete(f"/api/images/{copy}", headers=AUTH).status_code == 200
            after = {s["id"] for s in client.get("/api/audit").json()["suspects"]}
            assert victim not in after and copy not in after
            page = client.get("/").text
            assert 'id="audit-run"' in page and "/api/audit" in page
        assert {im.id: im.label for im in store.images()}[victim] == truth


def test_a_report_filtered_to_a_higher_cutoff_is_the_audit_at_that_cutoff(planted):
    with SQLiteStore(planted[0]) as store:
        low, high = audit(store, cutoff=0.3), audit(store, cutoff=0.9)
    assert at_cutoff(low, 0.9) == high and len(high.suspects) < len(low.suspects)
    with pytest.raises(BadInput, match="from 0.3 to 1"):
        at_cutoff(low, 0.2)


def test_page_shows_the_suspects_and_relabels_with_the_key(db, featurizer, planted):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, flips, copy = planted
    with SQLiteStore(db) as store, serving(create_app(store, featurizer, api_key=KEY, featurize_added=False)) as url:
        with chromium() as driver:
            driver.get(f"{url}/")
            wait = WebDriverWait(driver, 120)
            driver.find_element(By.ID, "audit-run").click()
            wait.until(lambda d: d.execute_script(
                "const imgs = [...document.querySelectorAll('#suspects img')];"
                "return imgs.length >= 3 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
            cards = {int(e.text.split()[0][1:]): e for e in driver.find_elements(By.CSS_SELECTOR, "#suspects li")}
            assert {*flips, copy} <= set(cards)
            victim, truth = next(iter(flips.items()))
            assert f"striped → {truth}" in cards[victim].text
            button = cards[victim].find_element(By.TAG_NAME, "button")
            button.click()  # no key yet: refused, nothing changes
            message = driver.find_element(By.ID, "audit-message")
            wait.until(lambda d: message.get_attribute("class") == "error" and "API key" in message.text)
            driver.find_element(By.ID, "key").send_keys(KEY)
            button.click()
            wait.until(lambda d: f"Image {victim}: striped → {truth}" in message.text)
            assert victim not in [int(e.text.split()[0][1:])
                                  for e in driver.find_elements(By.CSS_SELECTOR, "#suspects li")]
        assert {im.id: im.label for im in store.images()}[victim] == truth


def test_the_benchmark_measures_planted_mistakes_on_real_photos(small_dir, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "Python"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(root / "benchmarks" / "audit.py"), str(small_dir), "--flip", "0.06",
               "--duplicates", "1", "--cache", str(tmp_path), "--json"]
    (result,) = json.loads(subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                                          check=True).stdout)
    assert (result["images"], result["flipped"], result["copies"]) == (36, 2, 1)
    at = result["at_cutoff"]
    assert at["flagged"] >= at["planted_found"] >= 2 and at["recall"] == at["planted_found"] / 3
    assert set(result["by_cutoff"]) == {"0.34", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}
    assert all(0 < result[k] <= 1 for k in ("accuracy_planted", "accuracy_corrected", "accuracy_true_labels"))
