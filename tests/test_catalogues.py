"""Issue 29, the done-when flow on real photos: a CSV manifest of the bundled photos (12 per class) with a third of
the labels blank and a key, title and price per photo ingests (bad rows recorded), trains on the labelled ones,
ranks with keys and titles through the CLI and the REST API, returns unlabelled images among the results, and
suggests labels for the unlabelled ones, most of them right; keys re-ingested with other bytes replace their
image; JSON-lines manifests record their bad rows."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from support import pgserver
from support.liveserver import chromium, serving

from image_similarity.entrypoints import cli
from image_similarity.entrypoints.cli import main
from image_similarity.entrypoints.plots import plt, ranking_plot
from image_similarity.entrypoints.web import create_app
from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.manifest import ingest_manifest
from image_similarity.pipeline.neighbors import neighbors
from image_similarity.pipeline.rank import rank
from image_similarity.pipeline.split import split
from image_similarity.pipeline.suggest import suggestions
from image_similarity.pipeline.train import train
from image_similarity.store import SQLiteStore
from image_similarity.store.postgres import PostgresStore

LABELS = ("dotted", "leopard", "striped")


def catalogue_rows(sample_dir: Path, n: int) -> list[dict[str, str]]:
    """n photos per class: every third one unlabelled, each with a key, a title and a price."""
    rows = []
    for label in LABELS:
        for k, path in enumerate(sorted((sample_dir / label).iterdir())[:n]):
            rows.append({"path": str(path), "label": "" if k % 3 == 2 else label, "key": f"sku-{label}-{k}",
                         "title": f"{label.title()} fabric no. {k}", "price": f"{9.5 + k:.2f}", "hidden": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["path", "label", "key", "title", "price"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, sample_dir, featurizer):
    """(database path, manifest rows, the CLI's ingest output) of the manifest ingested, featurized, split,
    trained and evaluated."""
    folder = tmp_path_factory.mktemp("catalogue")
    rows = catalogue_rows(sample_dir, 12)
    manifest = write_csv(folder / "items.csv", rows + [{"path": "missing.jpg", "key": "sku-gone"}, {"path": ""}])
    db = folder / "catalogue.sqlite"
    return db, rows, manifest, featurizer


def test_a_manifest_with_blank_labels_ingests_trains_ranks_and_suggests(catalogue, capsys, sample_dir):
    db, rows, manifest, featurizer = catalogue
    assert main(["ingest", "--manifest", str(manifest), "--db", str(db), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ingest {manifest}: 36 added, 0 already stored, 2 skipped; 12 of those added unlabelled")
    assert "skipped missing.jpg: cannot read file" in out and "skipped items.csv line 39: no path" in out
    assert main(["ingest", "--manifest", str(manifest), "--db", str(db), "-q"]) == 0  # safe to re-run
    assert capsys.readouterr().out.startswith(f"ingest {manifest}: 0 added, 36 already stored, 2 skipped")
    with SQLiteStore(db) as store:
        images = store.images()
        assert len(store.rejected()) == 2 and len({im.key for im in images}) == 36
        assert {im.key: (im.label, im.metadata) for im in images}["sku-leopard-2"] == (
            None, {"title": "Leopard fabric no. 2", "price": "11.50"})
        featurize(store, featurizer, progress=False)
        assert split(store, seed=0)["unlabelled"] == 12
        model = train(store, featurizer.backbone)
        summary = evaluate(store, model)
        assert model.params["unlabelled"] == 12 and model.params["n_train"] + summary["n_test"] == 24
        assert summary["unlabelled"] == 12 and set(store.split()) == {im.id for im in images if im.label}
        found = suggestions(store, model)
        hidden = {r["key"]: r["hidden"] for r in rows}
        right = sum(s.suggested == hidden[s.key] for s in found)
        assert len(found) == 12 and right >= 9 and all(0 < s.probability <= 1 for s in found), right

    query = sorted((sample_dir / "striped").iterdir())[20]  # a photo not in the catalogue
    assert main(["rank", str(query), "--db", str(db), "--top", "36", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_key = {r["key"]: r for r in rows}
    assert result["suggested"] == "striped" and 0 < result["probability"] <= 1
    unlabelled = [m for m in result["matches"] if m["label"] is None]
    assert len(result["matches"]) == 36 and len(unlabelled) == 12
    assert all(m["metadata"]["title"] == by_key[m["key"]]["title"] and m["name"] == by_key[m["key"]]["path"]
               for m in result["matches"])
    assert all(m["suggested"] in LABELS for m in unlabelled) and result["matches"][0]["key"].startswith("sku-striped")
    assert main(["rank", str(query), "--db", str(db), "--top", "5"]) == 0
    printed = capsys.readouterr().out
    assert "; the model suggests striped (" in printed and "sku-striped" in printed and "Striped fabric no." in printed

    with SQLiteStore(db) as store:
        neighbors(store, featurizer.backbone, "cosine", 5, progress=False)
        client = TestClient(create_app(store, featurizer, api_key="k", reload_interval=0))
        answer = client.post("/api/rank?top=36", files={"file": (query.name, query.read_bytes(), "image/jpeg")}).json()
        assert [(m["id"], m["key"], m["metadata"]) for m in answer["matches"]] == [
            (m["image_id"], m["key"], m["metadata"]) for m in result["matches"]]
        assert answer["suggested"] == "striped" and sum(m["label"] is None for m in answer["matches"]) == 12
        assert all(m["suggested"] in LABELS for m in answer["matches"] if m["label"] is None)
        one = store.find_key("sku-dotted-2")
        near = client.get(f"/api/images/{one.id}/neighbors", params={"method": "cosine"}).json()["matches"]
        assert all(m["key"] == store.images()[m["id"] - 1].key and m["metadata"]["title"] for m in near)
        other = sorted((sample_dir / "dotted").iterdir())[30].read_bytes()
        added = client.post("/api/images", headers={"Authorization": "Bearer k"},
                            files={"file": ("new.jpg", other, "image/jpeg")},
                            data={"key": "sku-new", "metadata": json.dumps({"title": "New arrival"})})
        assert added.status_code == 201 and added.json()["label"] is None and added.json()["name"] == "new.jpg"
        assert store.find_key("sku-new").metadata == {"title": "New arrival"}
        bad = client.post("/api/images", headers={"Authorization": "Bearer k"},
                          files={"file": ("x.jpg", other, "image/jpeg")}, data={"metadata": "[1, 2]"})
        assert bad.status_code == 422 and "JSON object" in bad.text
        # the notebook's cells: print_ranking and ranking_plot show keys and suggested labels
        result = rank(store, query.read_bytes(), featurizer, top=15, save=False)
        cli.print_ranking(result)
        assert "sku-" in capsys.readouterr().out
        figure = ranking_plot(store, query.read_bytes(), result)
        captions = [ax.get_xlabel() for ax in figure.axes[1:]]
        assert all("\nsku-" in c for c in captions) and any("unlabelled" not in c and "? 0." in c for c in captions)
        plt.close(figure)


def test_a_key_ingested_again_with_other_bytes_replaces_its_image(tmp_path, sample_dir, featurizer):
    rows = catalogue_rows(sample_dir, 2)
    with SQLiteStore(tmp_path / "db.sqlite") as store:
        ingest_manifest(store, write_csv(tmp_path / "a.csv", rows), progress=False)
        featurize(store, featurizer, progress=False)
        old = store.find_key("sku-dotted-0")
        swapped = [dict(r, path=str(sorted((sample_dir / "dotted").iterdir())[5])) if r["key"] == "sku-dotted-0"
                   else r for r in rows]
        report = ingest_manifest(store, write_csv(tmp_path / "b.csv", swapped), progress=False)
        assert (report.added, report.replaced, report.already_stored) == (1, 1, 5)
        new = store.find_key("sku-dotted-0")
        assert new.id > old.id and new.sha256 != old.sha256 and len(store.images()) == 6
        assert old.id not in store.features(featurizer.backbone)[0].tolist()


def test_json_lines_manifests_keep_any_metadata_and_record_bad_rows(tmp_path, sample_dir):
    photo = min((sample_dir / "leopard").iterdir())
    lines = [json.dumps({"path": str(photo), "key": "a", "label": "leopard", "tags": ["spots", "gold"], "n": 3}),
             "", "not json", json.dumps([1, 2]), json.dumps({"path": str(photo), "label": 7}),
             json.dumps({"path": str(photo), "key": "b"})]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    with SQLiteStore(tmp_path / "db.sqlite") as store:
        report = ingest_manifest(store, tmp_path / "items.jsonl", progress=False)
        assert (report.added, report.unlabelled) == (2, 1)
        assert report.skipped == [("items.jsonl line 3", "not JSON: Expecting value"),
                                  ("items.jsonl line 4", "not a JSON object"),
                                  (str(photo), "items.jsonl line 5: the label is not text: 7")]
        assert [(im.key, im.label, im.metadata) for im in store.images()] == [
            ("a", "leopard", {"tags": ["spots", "gold"], "n": 3}), ("b", None, None)]
        assert len(store.rejected()) == 3


def test_the_postgresql_routine_ranks_with_keys_metadata_and_suggestions(pg_server, tmp_path, sample_dir, featurizer):
    """rank_candidates, inside the server: unlabelled items among the results, with key, metadata (jsonb) and
    the model's suggested label."""
    url = pgserver.create_database(pg_server, "catalogue_keys")
    rows = catalogue_rows(sample_dir, 9)
    with PostgresStore(url) as store:
        ingest_manifest(store, write_csv(tmp_path / "items.csv", rows), progress=False)
        featurize(store, featurizer, progress=False)
        assert split(store, seed=0)["unlabelled"] == 9
        train(store, featurizer.backbone)
        query = sorted((sample_dir / "striped").iterdir())[20].read_bytes()
        columns, found = store.run_procedure("RankCandidates", {"query": query, "top": 27})
    assert columns[-4:] == ["item_key", "metadata", "suggested", "probability"] and len(found) == 27
    titles = {r["key"]: r["title"] for r in rows}
    assert all(row[7]["title"] == titles[row[6]] for row in found)
    unlabelled = [row for row in found if row[3] is None]
    assert len(unlabelled) == 9 and all(row[8] in LABELS and 0 < row[9] <= 1 for row in unlabelled)


def test_ingest_from_the_view_over_your_own_table(tmp_path, sample_dir, capsys):
    """`ingest --from-view`: the rows of image_source (item_key, label, data), an empty label unlabelled; re-run
    adds nothing; without the view, one line."""
    db = tmp_path / "shop.sqlite"
    assert main(["ingest", "--from-view", "--db", str(db), "-q"]) == 1
    assert "cannot read the view image_source (item_key, label, data)" in capsys.readouterr().err
    photos = [sorted((sample_dir / label).iterdir())[0] for label in LABELS]
    with SQLiteStore(db) as store:
        store.db.query("CREATE TABLE products (sku TEXT PRIMARY KEY, category TEXT, photo BLOB)")
        store.db.query("CREATE VIEW image_source AS SELECT sku AS item_key, category AS label, photo AS data"
                       " FROM products")
        store.db.query_many("INSERT INTO products VALUES (?, ?, ?)",
                            [(f"p{i}", "" if i == 2 else label, p.read_bytes())
                             for i, (label, p) in enumerate(zip(LABELS, photos))])
        store.conn.commit()
    for out in ("ingest the view image_source: 3 added, 0 already stored, 0 skipped; 1 of those added unlabelled",
                "ingest the view image_source: 0 added, 3 already stored, 0 skipped"):
        assert main(["ingest", "--from-view", "--db", str(db), "-q"]) == 0
        assert capsys.readouterr().out.startswith(out)
    with SQLiteStore(db) as store:
        assert [(im.name, im.key, im.label) for im in store.images()] == [
            ("image_source/p0", "p0", "dotted"), ("image_source/p1", "p1", "leopard"), ("image_source/p2", "p2", None)]


def test_the_page_shows_keys_titles_and_suggestions(tmp_path, sample_dir, featurizer):
    """The web page in headless Chromium: under each match its key and title; an unlabelled match shows the
    label the model suggests and its probability, as the REST answer gives them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rows = catalogue_rows(sample_dir, 6)
    query = sorted((sample_dir / "dotted").iterdir())[20]  # a photo not in the catalogue
    with SQLiteStore(tmp_path / "page.sqlite") as store:
        ingest_manifest(store, write_csv(tmp_path / "items.csv", rows), progress=False)
        featurize(store, featurizer, progress=False)
        split(store, seed=0)
        train(store, featurizer.backbone)
        app = create_app(store, featurizer, api_key="k", reload_interval=0)
        with serving(app) as url, chromium() as driver:
            driver.get(f"{url}/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "model version" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file").send_keys(str(query))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 10)
            shown = [(e.find_element(By.CSS_SELECTOR, ".label").text, e.find_element(By.CSS_SELECTOR, ".item").text)
                     for e in driver.find_elements(By.CSS_SELECTOR, "#results li")]
            heading = driver.find_element(By.ID, "query-name").text
            upload = {"file": (query.name, query.read_bytes(), "image/jpeg")}
            answer = httpx.post(f"{url}/api/rank?top=10", files=upload, timeout=60).json()
    matches = answer["matches"]
    titles = {r["key"]: r["title"] for r in rows}
    assert [item for _, item in shown] == [f"{m['key']} · {titles[m['key']]}" for m in matches]
    unlabelled = [(label, m) for (label, _), m in zip(shown, matches) if m["label"] is None]
    assert unlabelled and all(m["suggested"] in LABELS for _, m in unlabelled)
    assert all(label == f"{m['rank']}. unlabelled ({m['suggested']}? {m['probability']:.2f})"
               for label, m in unlabelled)
    assert [label for (label, _), m in zip(shown, matches) if m["label"]] == [
        f"{m['rank']}. {m['label']}" for m in matches if m["label"]]
    assert heading.startswith(f"{query.name} · the model suggests {answer['suggested']} (")
