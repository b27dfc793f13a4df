"""A real browser against the running dashboard: headless Chromium (Debian's chromium and
chromium-driver, `make browser-deps`) driven by selenium opens every page on a fixture cache, waits
until the script has finished and every plotly figure is drawn, finds no error element, and saves a
screenshot. It also opens the HTML report (core/report.py) as a file with the network blocked and
finds every figure drawn, downloads the report from the dashboard's button, checks that the
Compute page opens on the sidebar's pair and dataset, and makes a new pair of tiny local models in
the browser, computes it and finds it on the Overview.

Skipped, with the reason, only where Chromium or its driver is not installed. Environment knobs:
- CIRCUITDIFF_SCREENSHOTS=<dir>: also save the screenshots there (how docs/*.png are made);
- CIRCUITDIFF_BROWSER_CACHE=<file>: browse that cache instead of building the small fixture.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core.query import ResultCache
from core.synthetic import build_fixture_cache, build_synthetic_cache
from test_pipeline import world  # noqa: F401 - the tiny models and data of the New pair test

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# url path -> page title, in the sidebar's order; "" is the default page.
PAGES = {"": "Overview", "Edge_heatmap": "Edge heatmap", "Distributions": "Distributions",
         "Circuit_graph": "Circuit graph", "Trajectory": "Trajectory", "Samples": "Samples",
         "Controls": "Controls", "Faithfulness": "Faithfulness", "Compute": "Compute"}
# The icon ligature is the first line of a link's text, the label the last.
PAGE_LINKS = '[data-testid="stSidebar"] [data-testid="stPageLink"]'
ERROR_SELECTOR = '[data-testid="stException"], [data-testid="stAlertContentError"]'
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1500,1800")
PAGE_TIMEOUT_S = 90
# No network for the report: names resolve nowhere, http(s) goes to a proxy that is not there
# (loopback included), and DevTools blocks any http(s) request that would still be made.
OFFLINE_FLAGS = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
                 "--proxy-bypass-list=<-loopback>")
REPORT_BUTTON = "Download report"


def _missing_browser() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install Debian's {package} (`make browser-deps`)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dashboard:
    """`streamlit run app.py` on a free localhost port, stopped by `stop()`."""

    def __init__(self, cache: Path, log: Path, *extra_args: str):
        self.port = _free_port()
        env = {**os.environ, "CIRCUITDIFF_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        env.pop("CIRCUITDIFF_READ_ONLY", None)
        self._log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
             "--server.headless", "true", "--server.address", "127.0.0.1", *extra_args],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy(log)

    def _wait_healthy(self, log: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the dashboard exited with {self.process.returncode}:\n"
                                   f"{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the dashboard did not answer within {timeout:.0f} s:\n{log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def _chromium(profile: Path, *extra_flags: str):
    """Headless Chromium under selenium, with the browser console's messages kept."""
    reason = _missing_browser()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, *extra_flags):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = _chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def offline_browser(tmp_path_factory):
    driver = _chromium(tmp_path_factory.mktemp("chromium-offline-profile"), *OFFLINE_FLAGS)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*"]})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    given = os.environ.get("CIRCUITDIFF_BROWSER_CACHE")
    if given:
        return Path(given)
    path = tmp_path_factory.mktemp("browser-cache") / "fixture.duckdb"
    build_fixture_cache(path)
    return path


def _settled(driver, title: str) -> bool:
    """An error is shown, or: the page's title is drawn, the script is no longer running, and every
    plotly chart has drawn its SVG. The script's state is read off the app's root element: the
    status widget appears only some time after a run starts, so its absence says nothing. An element
    that vanishes while it is read means the page is still being redrawn (a page switch replaces the
    old page's elements): not settled yet."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        if driver.find_elements(By.CSS_SELECTOR, ERROR_SELECTOR):
            return True  # reported by the caller
        if title not in [h.text for h in driver.find_elements(By.CSS_SELECTOR, "h1")]:
            return False
        root = driver.find_element(By.CSS_SELECTOR, '[data-testid="stApp"]')
        if root.get_attribute("data-test-script-state") != "notRunning":
            return False
        charts = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stPlotlyChart"]')
        drawn = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stPlotlyChart"] .main-svg')
        return len({c.id for c in charts}) <= len(drawn)
    except StaleElementReferenceException:
        return False


def open_page(driver, url: str, title: str) -> list[str]:
    """Open a page, wait until it settles, return the texts of its error elements."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.5).until(lambda d: _settled(d, title))
    time.sleep(0.5)  # let the last frame paint before the screenshot
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ERROR_SELECTOR)]


def _report_buttons(driver) -> list:
    from selenium.webdriver.common.by import By

    return [b for b in driver.find_elements(
        By.CSS_SELECTOR, '[data-testid="stSidebar"] [data-testid="stDownloadButton"] button')
        if b.text.splitlines()[-1] == REPORT_BUTTON]


def _page_links(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [a.text.splitlines()[-1] for a in driver.find_elements(By.CSS_SELECTOR, PAGE_LINKS)]


def _save(driver, name: str, tmp_path: Path) -> Path:
    shot = tmp_path / f"{name}.png"
    driver.save_screenshot(str(shot))
    extra = os.environ.get("CIRCUITDIFF_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(extra) / f"{name}.png")
    return shot


def test_every_page_renders_without_errors(browser, cache_file, tmp_path):
    app = Dashboard(cache_file, tmp_path / "dashboard.log")
    try:
        for path, title in PAGES.items():
            errors = open_page(browser, f"{app.url}/{path}", title)
            assert errors == [], f"page {title!r} shows errors: {errors}"
            if title != "Compute":
                assert len(_report_buttons(browser)) == 1, f"{title!r} offers no report"
            shot = _save(browser, f"page_{(path or 'overview').lower()}", tmp_path)
            assert shot.stat().st_size > 10_000, f"the screenshot of {title!r} looks empty"
            print(f"{title}: screenshot {shot}")
        # The sidebar lists every page, Compute included, outside read-only mode.
        assert _page_links(browser) == list(PAGES.values())
    finally:
        app.stop()


def test_read_only_mode_hides_compute(browser, cache_file, tmp_path):
    app = Dashboard(cache_file, tmp_path / "dashboard.log", "--", "--read-only")
    try:
        assert open_page(browser, app.url, "Overview") == []
        assert _page_links(browser) == [title for title in PAGES.values() if title != "Compute"]
        assert open_page(browser, f"{app.url}/Edge_heatmap", "Edge heatmap") == []
        assert len(_report_buttons(browser)) == 1  # presenting is when a report is handed on
    finally:
        app.stop()


def _luminance(css_color: str) -> float:
    """Relative luminance (0 black .. 1 white) of an `rgb(...)`/`rgba(...)` CSS colour."""
    r, g, b = (int(float(v)) / 255 for v in css_color[css_color.index("(") + 1:-1].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_dark_theme_follows_the_system_setting(browser, cache_file, tmp_path):
    from selenium.webdriver.common.by import By

    app = Dashboard(cache_file, tmp_path / "dashboard.log")
    try:
        for scheme, dark in (("dark", True), ("light", False)):
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
                "features": [{"name": "prefers-color-scheme", "value": scheme}]})
            assert open_page(browser, f"{app.url}/Edge_heatmap", "Edge heatmap") == []
            root = browser.find_element(By.CSS_SELECTOR, '[data-testid="stApp"]')
            background = _luminance(root.value_of_css_property("background-color"))
            text = _luminance(browser.find_element(By.CSS_SELECTOR, "h1").value_of_css_property("color"))
            assert (background < 0.2 < 0.7 < text) if dark else (text < 0.3 < 0.8 < background)
            _save(browser, f"page_edge_heatmap_{scheme}", tmp_path)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        app.stop()


# --- The report -----------------------------------------------------------------------------------

def _drawn_figures(driver) -> tuple[int, int]:
    """(plotly figure divs, those that have drawn their SVG)."""
    return tuple(driver.execute_script("""
        const divs = [...document.querySelectorAll('.plotly-graph-div')];
        return [divs.length, divs.filter(d => d.querySelector('.main-svg')).length];"""))


def test_the_report_draws_every_figure_with_the_network_blocked(offline_browser, cache_file,
                                                                tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    cache = ResultCache.open(cache_file)
    report = tmp_path / "report.html"
    report.write_text(cache.report_html(cache.runs()["run_key"].iloc[0]))
    expected = report.read_text().count('class="plotly-graph-div"')
    offline_browser.get_log("browser")  # drop earlier messages
    offline_browser.get(report.as_uri())
    WebDriverWait(offline_browser, PAGE_TIMEOUT_S, poll_frequency=0.5).until(
        lambda d: _drawn_figures(d)[1] == expected)
    assert _drawn_figures(offline_browser) == (expected, expected) and expected > 0
    fetched = offline_browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert [url for url in fetched if not url.startswith(("file:", "data:", "blob:"))] == []
    severe = [e["message"] for e in offline_browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    _save(offline_browser, "report", tmp_path)


def test_the_dashboard_button_downloads_the_report(browser, cache_file, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior",
                            {"behavior": "allow", "downloadPath": str(downloads)})
    run = ResultCache.open(cache_file).runs().iloc[0]  # the sidebar's first run and post model
    app = Dashboard(cache_file, tmp_path / "dashboard.log")
    try:
        assert open_page(browser, f"{app.url}/Edge_heatmap", "Edge heatmap") == []
        (button,) = _report_buttons(browser)
        button.click()
        WebDriverWait(browser, PAGE_TIMEOUT_S, poll_frequency=0.5).until(
            lambda _: [f for f in downloads.iterdir() if f.suffix == ".html"])
    finally:
        app.stop()
    (saved,) = downloads.iterdir()
    assert saved.name == f"circuitdiff_{run['pair']}_{run['post_label']}_{run['run_key'][:8]}.html"
    text = saved.read_text()
    assert run["run_key"] in text and 'class="plotly-graph-div"' in text


# --- Compute --------------------------------------------------------------------------------------

def test_compute_opens_on_the_sidebars_pair_and_dataset(browser, tmp_path):
    """A configured pair and dataset other than the first ones in the sidebar (by a link), then
    the Compute page's link: Compute shows them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from core import jobs

    cache = tmp_path / "configured-names.duckdb"
    # Runs named after configured pairs and datasets (the paper's).
    build_synthetic_cache(cache, n_pairs=2, n_datasets=2, alphas=(0.1,), n_samples=4,
                          layer_counts=(2, 2))
    runs = ResultCache.open(cache).runs()
    configured = jobs.configured()
    pair = next(p for p in runs["pair"] if p != next(iter(configured["pairs"])))
    dataset = next(d for d in runs["dataset"] if d != configured["datasets"][0])
    app = Dashboard(cache, tmp_path / "dashboard.log")
    try:
        assert open_page(browser, f"{app.url}/Samples?pair={pair}&dataset={dataset}", "Samples") == []
        link = next(a for a in browser.find_elements(By.CSS_SELECTOR, PAGE_LINKS)
                    if a.text.splitlines()[-1] == "Compute")
        link.click()
        WebDriverWait(browser, PAGE_TIMEOUT_S, poll_frequency=0.5).until(
            lambda d: _settled(d, "Compute"))
        def shown(label: str) -> str:
            return _element(browser, By.CSS_SELECTOR, f'input[aria-label="{label}"]') \
                .get_attribute("value")

        assert shown("Model pair or series") == f"{pair} (pair)"
        assert shown("Dataset") == dataset
        # Back on a result page, the sidebar still holds the selection.
        next(a for a in browser.find_elements(By.CSS_SELECTOR, PAGE_LINKS)
             if a.text.splitlines()[-1] == "Edge heatmap").click()
        WebDriverWait(browser, PAGE_TIMEOUT_S, poll_frequency=0.5).until(
            lambda d: _settled(d, "Edge heatmap"))
        assert (shown("Model pair or series"), shown("Dataset")) == (pair, dataset)
    finally:
        app.stop()


# --- A new pair, made in the browser ---------------------------------------------------------------

def _compute_page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text


def _after(driver, action, done, timeout: float = PAGE_TIMEOUT_S) -> None:
    """Do `action` (a rerun of the page follows), then wait until `done(driver)` holds and the
    page has settled again. A replaced element means the rerun is still drawing."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    deadline = time.monotonic() + timeout
    while True:
        try:
            action()
            break
        except StaleElementReferenceException:  # found, then replaced by a rerun: find it again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    time.sleep(0.5)  # the rerun starts after the browser sends the widget's value

    def ready(d) -> bool:
        try:
            return done(d) and _settled(d, "Compute")
        except StaleElementReferenceException:
            return False
    WebDriverWait(driver, timeout, poll_frequency=0.5).until(ready)


def _element(driver, by: str, selector: str, index: int = 0):
    """The `index`-th element the selector finds, once it is drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.2).until(
        lambda d: (found := d.find_elements(by, selector)) and len(found) > index
        and found[index])


def _fill(driver, label: str, text: str, index: int = 0) -> None:
    """Type `text` into the `index`-th text or number input labelled `label`, and commit it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    selector = f'input[aria-label="{label}"]'

    def type_it():
        box = _element(driver, By.CSS_SELECTOR, selector, index)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(text, Keys.ENTER)
    _after(driver, type_it, lambda d: _element(d, By.CSS_SELECTOR, selector, index)
           .get_attribute("value") == text)


def _click(driver, by: str, selector: str, index: int = 0, done=lambda d: True,
           timeout: float = PAGE_TIMEOUT_S) -> None:
    _after(driver, lambda: _element(driver, by, selector, index).click(), done, timeout)


def _shown(by: str, selector: str, count: int = 1):
    """Done once `count` elements match (0: once none does)."""
    return lambda d: len(d.find_elements(by, selector)) == count


def _button(label: str) -> str:
    """XPath of a button by its text (its icon ligature is a line of its own)."""
    return f'//button[.//p[normalize-space(.)="{label}"]]'


def test_a_pair_made_in_the_browser_is_computed_and_shown_on_the_overview(browser, world,
                                                                         tmp_path):
    """On an empty cache: New pair from two tiny local folders and an uploaded JSONL, Save, Start
    with few alphas, wait for the job, and find the run on the Overview."""
    from selenium.webdriver.common.by import By

    # The world's tiny models under names that make distinct labels (a label may not be "base").
    for role in ("base", "post"):
        (tmp_path / f"tiny-{role}").symlink_to(world / role)
    cache = tmp_path / "made-here.duckdb"
    app = Dashboard(cache, tmp_path / "dashboard.log")
    try:
        assert open_page(browser, f"{app.url}/Compute", "Compute") == []
        _click(browser, By.CSS_SELECTOR, '[data-testid="stExpander"] summary',
               done=_shown(By.CSS_SELECTOR, 'input[aria-label="Name of the new pair"]'))
        _fill(browser, "Name of the new pair", "made-here")
        radio = '//label[@data-testid="stRadioOption"][normalize-space(.)="{}"]'
        for index, role in enumerate(("base", "post")):
            _click(browser, By.XPATH, radio.format("local folder"), index,
                   _shown(By.CSS_SELECTOR, 'input[aria-label="Local folder"]', index + 1))
            _fill(browser, "Local folder", str(tmp_path / f"tiny-{role}"), index)
        _fill(browser, "Answer token limit", "12")
        _click(browser, By.XPATH, radio.format("upload"),
               done=_shown(By.CSS_SELECTOR, 'input[type="file"]'))
        _after(browser, lambda: _element(browser, By.CSS_SELECTOR, 'input[type="file"]')
               .send_keys(str(world / "data.jsonl")),
               lambda d: "data.jsonl" in _compute_page_text(d))
        _click(browser, By.XPATH, _button("Save"), timeout=300,
               done=lambda d: "Saved the pair" in _compute_page_text(d))
        assert _element(browser, By.CSS_SELECTOR, 'input[aria-label="Model pair or series"]') \
            .get_attribute("value") == "made-here (pair, made here)"
        # One alpha is enough here: the paper's largest.
        for alpha in ("0.03", "0.1", "0.3"):
            remove = f'button[aria-label="Remove {alpha}"]'
            _click(browser, By.CSS_SELECTOR, remove, done=_shown(By.CSS_SELECTOR, remove, 0))
        _click(browser, By.XPATH, _button("Start"), timeout=600, done=lambda d: any(
            state in _compute_page_text(d) for state in (" · done · ", " · failed · ")))
        assert " · done · " in _compute_page_text(browser), _compute_page_text(browser)

        assert open_page(browser, f"{app.url}/", "Overview") == []
        text = browser.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text
        assert "made-here · data · tiny-base → tiny-post" in text
        assert "Pooled: 1 run(s)" in text
        _save(browser, "made_here_overview", tmp_path)
    finally:
        app.stop()
