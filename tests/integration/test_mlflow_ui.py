"""The MLflow UI as a user sees it, in a real browser (Debian's Chromium driven by Selenium): a
two-format sweep of SmolLM2, served by `python -m pipeline ui`, opens on the runs with the
headline metrics first, compares the two runs on them, and shows each run's description with
its plot. Screenshots are kept in test-artifacts/mlflow-ui/."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.tracking import ui
from pipeline.tracking.metrics import HEADLINE_NAMES
from tests.conftest import free_ports
from tests.integration.conftest import TrackedSweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
SHOTS = ROOT / "test-artifacts" / "mlflow-ui"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# as root, without a GPU, and offline: no sandbox, no GPU process, no calls home
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (CHROMIUM and DRIVER):
        pytest.skip("no Chromium here: `make test` installs Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def links(tracked_sweep: TrackedSweep) -> Iterator[dict[str, str]]:
    """`python -m pipeline ui` on the sweep's sqlite store: the links it prints, while it runs."""
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "pipeline", "ui", f"tracking.uri={tracked_sweep.uri}", f"port={port}"]
    # Ctrl-C as in a terminal: a test before may have left SIGINT ignored, which a child inherits
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    found: dict[str, str] = {}
    deadline = time.monotonic() + 120
    for line in process.stdout:  # the links come once the server answers
        name, _, url = line.strip().partition(": ")
        if url.startswith("http://"):
            found[name] = url
        if "models" in found or time.monotonic() > deadline:
            break
    try:
        assert "tests" in found, found
        yield found
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        finally:
            process.kill()  # a UI that ignored Ctrl-C must not outlive the test (its server dies with it)
        assert code == 0


def _text_when(driver: Any, *needles: str, timeout_s: float = 60) -> str:
    """The page's visible text once it shows every needle (the UI renders after its requests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = driver.find_element("tag name", "body").text
        if all(n in text for n in needles):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {needles}: {text[:1500]}")
        time.sleep(0.5)


def test_the_experiment_opens_on_the_runs_with_the_headline_metrics_first(
    browser: Any, links: dict[str, str], tracked_sweep: TrackedSweep
) -> None:
    _, children = tracked_sweep.runs()
    browser.get(links["tests"])
    text = _text_when(browser, "output_tok_s", *(run.info.run_name for run in children.values()))
    browser.save_screenshot(str(SHOTS / "runs.png"))
    assert browser.title.startswith("Runs"), browser.title  # not the GenAI overview of traces
    assert "Traces: 0" not in text
    # the table's columns after the run's name and date, left to right: the headline metrics
    headers = browser.execute_script(
        "return [...document.querySelectorAll('.ag-header-cell[col-id]')]"
        ".map(e => [e.getBoundingClientRect().left, e.getAttribute('col-id')])"
    )
    columns = [column for _, column in sorted(headers) if column.startswith(("metrics.", "params."))]
    logged = children["none"].data.metrics
    assert columns[:4] == [f"metrics.`{name}`" for name in HEADLINE_NAMES if name in logged][:4], columns


def test_a_compare_of_the_two_runs_offers_the_headline_metrics(
    browser: Any, links: dict[str, str], tracked_sweep: TrackedSweep
) -> None:
    _, children = tracked_sweep.runs()
    experiment = children["fp8"].info.experiment_id
    base = links["tests"].split("/#/")[0]
    browser.get(ui.compare_url(base, experiment, [run.info.run_id for run in children.values()]))
    text = _text_when(browser, "Comparing 2 Runs", "Clear All", "Run details")
    browser.save_screenshot(str(SHOTS / "compare.png"))
    # the plot starts on the first metric a run logged: the throughput, against what varies
    chosen = text[text.index("Parameters:") : text.index("Clear All")].split()
    assert chosen == ["Parameters:", "quant", "Metrics:", "output_tok_s"], chosen
    # the runs page's chart view: a first section with a bar per headline metric, both runs in each
    browser.get(links["tests"] + "&compareRunsMode=CHART")
    text = _text_when(browser, "Headline", "System metrics", "ttft_p99_ms")
    browser.save_screenshot(str(SHOTS / "charts.png"))
    charts = text[text.index("Headline") :]  # after the toolbar, which names the sort
    order = [charts.index(shown) for shown in ("output_tok_s", "ttft_p99_ms", "System metrics")]
    assert order == sorted(order), text[:2000]


def test_the_run_page_shows_the_card_with_its_plot(
    browser: Any, links: dict[str, str], tracked_sweep: TrackedSweep
) -> None:
    _, children = tracked_sweep.runs()
    run = children["fp8"]
    base = links["tests"].split("/#/")[0]
    browser.get(ui.run_url(base, run.info.experiment_id, run.info.run_id))
    _text_when(browser, "smollm2-135m · fp8 · tp1 pp1 · cpu · tensorrt backend", "Show more")
    browser.find_element("xpath", "//*[text()='Show more']").click()  # the description opens folded
    text = _text_when(browser, "Quality:", "Accuracy gate:", "At c=2, the benchmark's highest load")
    assert re.search(r"output tok/s\s+TTFT p50 ms", text), text[:2000]
    deadline = time.monotonic() + 30
    while True:  # the plot is the run's own artifact, served by the tracking server
        loaded = browser.execute_script(
            "return [...document.images].filter(i => i.src.includes('get-artifact') && i.naturalWidth > 0).length"
        )
        if loaded or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    browser.save_screenshot(str(SHOTS / "run.png"))
    assert loaded == 1
