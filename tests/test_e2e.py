"""The whole pipeline through real DVC on the smoke preset, in a copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import ROOT, SMOKE

from lethe.methods import CANDIDATES, INFERENCE, METHODS, MITIGATE, VARIANTS

pytestmark = pytest.mark.e2e


def sh(*args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository holding the project's tracked files, with the smoke preset as params.yaml."""
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    sh("lethe", "preset", str(SMOKE.relative_to(ROOT)), cwd=repo, env=env)  # a section it leaves out: at its default
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    env["LETHE_WARM"] = "1"  # the opt-in warm start (lethe.warm), exercised over the whole graph
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke"]):
        sh(*command, cwd=repo, env=env)
    return repo, env


@pytest.fixture(scope="module")
def reproduced(repo):
    """The whole pipeline, run by `lethe repro` two stages at a time: DVC's own graph, `stage.changed()` and
    `dvc commit` (test_repro.py), and half the wall time of `dvc repro`, whose every stage pays the import
    floor. `test_second_repro_does_nothing` then checks with `dvc repro` itself that dvc.lock is complete."""
    repo, env = repo
    return sh("lethe", "repro", "--jobs", "2", cwd=repo, env=env)


def test_repro_runs_every_stage_and_writes_outputs(repo, reproduced):
    repo, _ = repo
    stages = ["prepare", "calibrate", "shard", "pretrain", "featurizer", "report", "register", "detect", "localize", "memcontrol",
              "select_loyal",
              *(f"mitigate@{v}" for v in MITIGATE)]
    stages += [f"{stage}@{m}" for m in METHODS for stage in ("train", "evaluate")]
    stages += [f"evaluate@{v}" for v in INFERENCE] + ["audit@baseline", "audit@champion"]
    for stage in stages:
        assert f"Running stage '{stage}'" in reproduced
    for path in ("data/prepared/images.npy", "data/prepared/manifest.jsonl",
                 "models/pretrained/weights.safetensors", "models/pretrained/config.json",
                 "models/baseline/weights.safetensors", "models/baseline/samples.png"):
        assert (repo / path).is_file(), path
    metrics = json.loads((repo / "metrics/train/baseline.json").read_text())
    for group in ("dup", "unique", "holdout"):
        assert 0.0 <= metrics[f"probe/own_nn_rate/{group}"] <= 1.0
    assert metrics["cost/train_seconds"] > 0 and metrics["cost/trainable_params"] > 0
    assert not list(repo.glob(".lethe/checkpoints/*"))  # finished stages leave nothing to resume
    # LETHE_WARM=1: the stages ran in children of the run's warm server, none refused
    log = "\n".join(path.read_text() for path in repo.glob(".lethe/warm-*.log"))
    assert log.count(" runs as ") >= len(stages) - 2 and "refused" not in log, log[-2000:]
    for path in ("models/featurizer/weights.safetensors", "reports/evaluate/baseline/gallery.png",
                 "reports/evaluate/baseline/samples.png", "reports/report.md", "reports/report.html",
                 "reports/tradeoff.png", "plots/tradeoff.json", "reports/registry.json", "metrics/data.json",
                 "metrics/calibration.json", *(f"metrics/outcomes/{v}.npz" for v in VARIANTS)):
        assert (repo / path).is_file(), path
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["data/planted_pairs"] == 4 == data["data/dup_prompts"] and data["data/duplicate_groups"] == 0
    assert (data["data/judged_dup_prompts"], data["data/tune_dup_pictures"], data["data/tune_pictures"]) == (3, 1, 10)
    calibration = json.loads((repo / "metrics/calibration.json").read_text())
    assert calibration["calibration/calibration_images"] == calibration["calibration/heldout_images"] == 20
    for key in ("heldout_fpr", "generation_null_rate"):  # measured on images that did not set the threshold
        rate = f"calibration/rel_l2/{key}"
        assert 0 <= calibration[f"{rate}/ci_low"] <= calibration[rate] <= calibration[f"{rate}/ci_high"] <= 1
    registry = json.loads((repo / "reports/registry.json").read_text())
    assert set(registry["policy"]) == set(CANDIDATES)  # a verdict for every variant but the A/A replicates
    audited = json.loads((repo / "reports/audit/champion/audit.json").read_text())
    champion = next(v for v, n in registry["versions"].items() if n == registry["aliases"]["champion"])
    assert audited["variant"] == champion and (repo / "reports/audit/champion/index.html").is_file()
    summary = json.loads((repo / "reports/audit/baseline.json").read_text())
    # 40 target pictures, 4 planted, 1 of them in the tune part: never audited
    assert summary["audit/images"] == 39 and 0 <= summary["audit/planted_recall"] <= 1


def test_evaluation_metrics_per_group(repo, reproduced):
    repo, _ = repo
    metrics = json.loads((repo / "metrics/baseline.json").read_text())
    for group in ("dup", "unique", "holdout"):
        for name in ("sim_top1_mean", "sim_p95", "rate", "nn_ratio_rate", "rel_l2_rate"):
            assert 0.0 <= metrics[f"replication/{name}/{group}"] <= 1.0 + 1e-6
        assert metrics[f"quality/fd/{group}"] >= 0
        assert 0.0 <= metrics[f"quality/prompt_accuracy/{group}"] <= 1.0
        for name in ("replication/rate", "quality/fd", "quality/kid", "quality/prompt_accuracy"):
            key = f"{name}/{group}"
            assert metrics[f"{key}/ci_low"] <= metrics[key] <= metrics[f"{key}/ci_high"], key
    variant = json.loads((repo / "metrics/loyal.json").read_text())
    for key in ("replication/rate/dup", "quality/fd/holdout", "quality/kid/holdout", "quality/prompt_accuracy/holdout"):
        change = "vs_baseline/" + key.replace("/", "_")
        assert variant[f"{change}/diff/ci_low"] <= variant[f"{change}/diff"] <= variant[f"{change}/diff/ci_high"], change
        assert variant[f"{change}/diff"] == pytest.approx(variant[key] - metrics[key], abs=1e-9)
        assert variant[f"{change}/significant"] in (-1.0, 0.0, 1.0)
    assert metrics["cost/seconds_per_image"] > 0 and metrics["cost/trainable_params"] > 0
    report = (repo / "reports/report.md").read_text()
    assert all(f"| {m} |" in report for m in VARIANTS)
    assert "## Detection on the baseline" in report and "## NeMo neurons" in report
    points = json.loads((repo / "plots/tradeoff.json").read_text())
    assert [p["variant"] for p in points] == list(CANDIDATES)
    assert "## A/A: the baseline against itself" in report and "## Provenance" in report
    assert points[0]["variant"] == "baseline" and points[0]["fd"] == metrics["quality/fd/holdout"]
    assert points[0]["replication_rate"] == metrics["replication/rate/dup"]
    page = (repo / "reports/report.html").read_text()
    registry = json.loads((repo / "reports/registry.json").read_text())
    champion = next(v for v, n in registry["versions"].items() if n == registry["aliases"]["champion"])
    assert f"Champion: <b>{champion}</b>" in page and "evaluate/baseline/gallery.png" in page and "[" in page
    assert "#/experiments/1?workflowType=machine_learning" in page  # opens MLflow on the training runs


def test_what_the_tuning_stages_read_is_never_judged(repo, reproduced):
    """MemControl's study, select_loyal and NeMo's tau_mem record the pictures, captions and seeds they chose
    on; evaluate's outcomes and detect's scores record what was judged. They never meet."""
    import numpy as np

    repo, _ = repo
    read = [json.loads((repo / f"reports/{stage}/prompts.json").read_text()) for stage in ("memcontrol", "loyal", "localize")]
    tuned_ids = {i for r in read for ids in r["pictures"].values() for i in ids}
    tuned_captions = {c for r in read for cs in r["captions"].values() for c in cs}
    assert tuned_ids and all(min(r["seeds"], default=10**6) >= 10**6 for r in read)
    judged_captions = set()
    for variant in VARIANTS:
        with np.load(repo / f"metrics/outcomes/{variant}.npz") as outcomes:
            judged_captions |= {str(c) for key in outcomes.files if key.endswith("prompts") for c in outcomes[key]}
    detected = json.loads((repo / "reports/detect/scores.json").read_text())
    assert judged_captions and not tuned_captions & (judged_captions | {r["caption"] for r in detected})
    assert not tuned_ids & {r["id"] for r in detected}
    manifest = [json.loads(line) for line in (repo / "data/prepared/manifest.jsonl").read_text().splitlines()]
    assert {r["id"] for r in manifest if r["part"] == "tune"} >= tuned_ids  # the manifest shows the split


def test_mitigations_log_their_own_metrics(repo, reproduced):
    repo, _ = repo
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("lethe-smoke")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    for method in METHODS:
        assert "train/skipped_share" in runs[f"train@{method}"].data.metrics
        trained = json.loads((repo / f"metrics/train/{method}.json").read_text())
        assert trained["train/samples_seen"] == 12 * 8  # the same budget for every method
    plus = runs["train@ietagc_plus"].data
    assert plus.params["ietagc_plus.msr_share"] == "0.25" and "round/moved_samples" in plus.metrics
    assert "round/proxy_spread" in runs["train@ietagc"].data.metrics
    choice = json.loads((repo / "search/loyal.json").read_text())  # select_loyal's, which both trained with
    loyal, raunet = (json.loads((repo / f"models/{v}/config.json").read_text())["raunet"] for v in ("loyal", "raunet"))
    assert loyal["skips"] == raunet["skips"] == choice["skips"] and len(choice["skips"]) == 2  # half of the 4 skips
    assert loyal["tau"] == choice["tau"] > 0 and raunet["tau"] == 0
    assert (repo / "reports/loyal/analysis.md").is_file() and (repo / "reports/loyal/skips.png").is_file()


def test_registered_champion_generates_in_a_fresh_process(repo, reproduced):
    repo, env = repo
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    champion = client.get_model_version_by_alias("lethe-smoke", "champion")
    assert client.get_model_version_by_alias("lethe-smoke", "baseline").version == champion.version
    assert "metric/replication/rate/dup" in champion.tags and champion.tags["method"] == "baseline"
    script = (
        "import mlflow, pandas as pd; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db');"
        "m = mlflow.pyfunc.load_model('models:/lethe-smoke@champion');"
        "out = m.predict(pd.DataFrame({'prompt': ['a bold thin handwritten one from a ledger', 'a two'], 'seed': [1, 2]}));"
        "print(out.shape, out.dtype)"
    )
    out = sh(sys.executable, "-c", script, cwd=repo, env=env)
    assert "(2, 16, 16, 1) uint8" in out


def test_mlflow_has_one_run_per_stage(repo, reproduced):
    repo, _ = repo
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("lethe-smoke")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    nested = sorted(n for n in runs if n.startswith("memcontrol/"))
    assert nested[0] == "memcontrol/full-finetune" and len(nested) == 3  # the reference and 2 trials
    runs = {n: r for n, r in runs.items() if not n.startswith("memcontrol/")}
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its training runs
    assert runs["prepare"].data.metrics["data/planted_pairs"] == 4
    assert set(runs) == {"prepare", "calibrate", "pretrain", "featurizer", "report", "register", "detect@baseline", "select_loyal@loyal",
                         "localize@nemo", "memcontrol", "audit@baseline", "audit@champion",
                         *(f"{stage}@{m}" for m in METHODS for stage in ("train", "evaluate")),
                         *(f"evaluate@{v}" for v in INFERENCE)}
    baseline = runs["train@baseline"]
    assert baseline.data.tags["method"] == "baseline" and len(baseline.data.tags["git_commit"]) == 40
    assert "train/loss" in baseline.data.metrics and "lr-AdamW" in baseline.data.metrics
    assert "train/device/samples_per_sec" in baseline.data.metrics
    assert len(client.get_metric_history(baseline.info.run_id, "train/loss")) >= 2
    assert "samples.png" in [a.path for a in client.list_artifacts(baseline.info.run_id)]


def test_second_repro_does_nothing(repo, reproduced):
    repo, env = repo
    out = sh("dvc", "repro", cwd=repo, env=env)
    assert "Running stage" not in out
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    assert len(client.search_model_versions("name='lethe-smoke'")) == len(CANDIDATES)


def test_changed_training_param_reruns_only_dependents(repo, reproduced):
    """What DVC would run after a change of loyal.tau: a dry run that forces the changed stages' downstream
    stages (their actual re-run is what the first repro already tested, and costs minutes)."""
    repo, env = repo
    params = (repo / "params.yaml").read_text()
    changed = yaml.safe_load(params)
    changed["loyal"]["tau"] = 300
    (repo / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        out = sh("dvc", "repro", "--dry", "--force-downstream", cwd=repo, env=env)
    finally:
        (repo / "params.yaml").write_text(params)
    for stage in ("select_loyal", "train@loyal", "train@raunet", "evaluate@loyal", "evaluate@raunet", "report", "register"):
        assert f"Running stage '{stage}'" in out
    for untouched in ("prepare", "shard", "pretrain", "featurizer", "train@baseline", "evaluate@baseline", "train@ietagc",
                      "memcontrol", "train@memcontrol"):
        assert f"Running stage '{untouched}'" not in out


def test_detection_localization_and_inference_mitigations(repo, reproduced):
    repo, _ = repo
    detect = json.loads((repo / "metrics/detect.json").read_text())
    for score in ("wen_first", "wen_all", "memattn_e", "memattn_d", "nemo_ssim"):
        auroc = detect[f"detection/{score}/planted_auroc"]
        assert 0.0 <= auroc <= 1.0, score  # dup and holdout prompts are both present in the smoke preset
    assert (repo / "reports/detect/roc.png").is_file() and (repo / "reports/detect/scores.json").is_file()
    localized = json.loads((repo / "metrics/localize.json").read_text())
    assert localized["nemo/tau_mem"] > 0 and localized["nemo/localized_prompts"] <= localized["nemo/memorized_prompts"]
    assert 0 <= localized["nemo/blockable_prompts"] <= localized["nemo/memorized_prompts"]
    assert 0 < detect["detection/memattn_begin_mass/other"] < 1
    nemo = json.loads((repo / "models/nemo/config.json").read_text())
    assert len(nemo["nemo"]["neurons"]) == localized["nemo/union_neurons"]
    assert json.loads((repo / "models/memattn/config.json").read_text())["inference"]["memattn"]["begin_scale"] == 1.25
    wen = json.loads((repo / "models/wen_inference/config.json").read_text())["inference"]["wen_inference"]
    assert wen["target"] == detect["detection/wen_first/mean/tune"]  # the tune split sets it, never the judged prompts
    for variant in INFERENCE:
        assert 0.0 <= json.loads((repo / f"metrics/{variant}.json").read_text())["replication/rate/dup"] <= 1.0


def test_memcontrol_search_trains_and_registers_its_mask(repo, reproduced):
    repo, _ = repo
    chosen = json.loads((repo / "search/memcontrol.json").read_text())
    assert chosen["family"] == "lora" and chosen["blocks"] and len(chosen["pareto_front"]) in (1, 2)
    assert (repo / "reports/memcontrol/pareto.png").is_file() and list(repo.glob("search/studies/*.journal"))
    search = json.loads((repo / "metrics/search/memcontrol.json").read_text())
    assert search["memcontrol/trials"] == 2 and 0 < search["memcontrol/chosen/trainable_share"] < 0.5  # projections only
    trained = json.loads((repo / "metrics/train/memcontrol.json").read_text())
    assert trained["cost/trainable_params"] == chosen["trainable_params"]  # the mask's parameters, not the model's
    assert "lora" not in json.dumps(json.loads((repo / "models/memcontrol/config.json").read_text()))  # merged
    assert "## MemControl" in (repo / "reports/report.md").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("lethe-smoke")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "memcontrol"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 3 and all("memcontrol/fd" in r.data.metrics and "cost/trainable_share" in r.data.metrics
                                    for r in trials)
    versions = client.search_model_versions("name='lethe-smoke'")
    assert any(v.tags.get("method") == "memcontrol" for v in versions)


def dvc_status(repo, env) -> dict:
    result = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_stale_dependencies_of_old_are_seen_by_dvc(repo, reproduced):
    """The two stages whose dvc.yaml entries once hid a change: IET-AGC+ reads `ietagc`'s section, and an
    inference-time variant's evaluation runs its mitigation's code."""
    repo, env = repo
    params, code = repo / "params.yaml", repo / "src/lethe/inference/prompt_embedding.py"
    saved = params.read_text(), code.read_text()
    try:
        params.write_text(saved[0].replace("agc_lambda: 2.0", "agc_lambda: 12.0"))
        assert params.read_text() != saved[0]
        stale = dvc_status(repo, env)
        assert {"train@ietagc", "train@ietagc_plus"} <= set(stale) and "train@baseline" not in stale
        params.write_text(saved[0])
        code.write_text(saved[1] + "\n# changed\n")
        stale = dvc_status(repo, env)
        assert {"mitigate@wen_inference", "evaluate@wen_inference"} <= set(stale)
        assert "evaluate@baseline" not in stale and "train@baseline" not in stale
    finally:
        params.write_text(saved[0])
        code.write_text(saved[1])
