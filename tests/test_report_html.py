"""One HTML report: a tiny Snakemake run of Table 2 with its figures, then `snakemake --report`, opened in
headless Chromium (as the MLflow UI test does)."""
import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import snakemake

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXP = "atss-r50-dyh6-LSC-1x"
FIGURES = [f"reports/figures/{n}_table2.png" for n in ("curves", "gains")] + \
          [f"reports/figures/{n}_{EXP}.png" for n in ("fig3", "fig4", "detections")]
TARGETS = ["reports/table2.md", *FIGURES]


def _chromium(*args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_the_report_holds_every_table_and_figure_of_the_run(repo_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("DYHEAD_EXT_DIR", raising=False)
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    profile = repo_copy / "params/profiles/tiny.yaml"
    prof = yaml.safe_load(profile.read_text())
    prof["curve"] = {"period": 2, "images": 8}  # learning curves with AP points
    profile.write_text(yaml.safe_dump(prof, allow_unicode=True))
    # Table 2 cut to the baseline, 1 and 6 blocks (three trainings, not eight): the report is what is tested
    tables_path = repo_copy / "params/tables.yaml"
    tables = yaml.safe_load(tables_path.read_text())
    tables["table2"]["rows"] = [r for r in tables["table2"]["rows"] if r["label"]["blocks"] in (0, 1, 6)]
    del tables["table2"]["noise"]
    tables_path.write_text(yaml.safe_dump(tables, allow_unicode=True, sort_keys=False))
    config = ["--config", "profile=tiny"]
    snakemake("--cores", "2", *TARGETS, *config, cwd=repo_copy)
    for path in FIGURES:
        assert (repo_copy / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert "| ellipse |" in (repo_copy / f"reports/perclass_{EXP}.md").read_text()

    snakemake("--report", "reports/report.html", *TARGETS, *config, cwd=repo_copy)
    page = repo_copy / "reports/report.html"
    html = page.read_text()
    for name in ["table2.html", f"perclass_{EXP}.html"] + [p.rsplit("/", 1)[1] for p in FIGURES]:
        assert name in html, f"{name} is not in the report"

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI: apt-get install -y chromium): the report was checked as text only")
    shot = tmp_path / "report.png"
    _chromium("--window-size=1400,1000", f"--screenshot={shot}", page.as_uri(), tmp_path=tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot of the report"
    dom = _chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<script.*?</script>", "", dom, flags=re.S)))
    assert "tiny" in text, text[:2000]  # the workflow description names the profile
    for category in ("table2", "Figures"):
        assert category in text, f"{category} not on the report's page: {text[:2000]}"
