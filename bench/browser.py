"""A tutorial as a student meets it: JupyterLab in a real browser, the notebook run from the UI.

    pip install -e ".[notebooks,browser]"              # selenium
    apt-get install -y chromium chromium-driver         # Debian's browser and its driver
    python bench/browser.py                             # notebook 01 -> data/results/tutorial_browser.png

Starts JupyterLab headless on 127.0.0.1 with a token generated here, serving a copy of the
notebook with its outputs cleared (JupyterLab saves a notebook it runs: the committed one is never
touched), opens it in headless Chromium driven by Selenium, runs every cell from the menu
(Run > Run All Cells), waits until each code cell has its execution count, checks that the
browser shows at least as many figures as the notebook's code draws, and saves the screenshot of
the first cell that shows a figure. JupyterLab and the browser are stopped at the end, whatever
happens. Nothing leaves the machine: Chromium starts with its background networking, component
updates, sync and QUIC off, in a fresh profile, and JupyterLab's news and update checks are off.

Outside CI (a browser, minutes on a CPU): ``tests/test_notebooks.py`` runs the same notebooks
with nbclient.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]
# JupyterLab user settings for the run: every cell kept in the page (no windowing, so that each
# cell's output can be found and photographed), no news fetched from the internet
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def _tutorials_module():
    spec = importlib.util.spec_from_file_location("tutorials_execute", TUTORIALS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_jupyter(root: Path, home: Path, token: str, port: int, log) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1:port serving ``root``, its config, data, runtime and settings in
    ``home`` (nothing read from or written to the user's own Jupyter folders)."""
    settings = home / "settings"
    for name, value in SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    env.pop("MPLBACKEND", None)   # the kernel's default: the inline backend
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")   # a container's root user
    return subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)


def wait_for_jupyter(proc: subprocess.Popen, port: int, token: str, timeout: float) -> None:
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"JupyterLab did not answer on port {port} within {timeout:.0f} s")


def open_browser(chromium: str, chromedriver: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def run_all_from_the_menu(driver, code_cells: int, timeout: float) -> float:
    """Click Run > Run All Cells and wait until every code cell shows its execution count;
    returns the seconds that took."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 120)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    # the kernel is up when the status bar says "<kernel name> | Idle"
    wait.until(lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll('.jp-StatusBar-Widget')).some("
        "w => w.textContent.includes(' | Idle') && !w.textContent.includes('No Kernel'));"))

    def prompts(d):
        return d.execute_script(
            "return Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))"
            ".map(p => p.textContent.trim());")

    def started(d):
        return any(p != "[ ]:" for p in prompts(d))

    def all_counted(d):
        shown = prompts(d)
        done = [p for p in shown if p[1:-2].strip().isdigit()]
        return len(shown) == code_cells and len(done) == code_cells

    t0 = time.monotonic()
    for attempt in range(3):   # a click that lands while the page is still settling does nothing
        wait.until(ec.element_to_be_clickable(
            (By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and text()='Run']"))).click()
        wait.until(ec.element_to_be_clickable(
            (By.XPATH, "//div[contains(@class,'lm-Menu-itemLabel') and text()='Run All Cells']"))).click()
        t0 = time.monotonic()
        try:
            WebDriverWait(driver, 30, poll_frequency=1).until(started)
            break
        except TimeoutException:
            if attempt == 2:
                raise
    WebDriverWait(driver, timeout, poll_frequency=2).until(all_counted)
    return time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notebook", default="01",
                    help="the tutorial to run, by its number or file name (default 01), or the "
                         "path of another notebook")
    ap.add_argument("--out", default=str(REPO / "data" / "results" / "tutorial_browser.png"),
                    help="where the screenshot of the first figure cell goes")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds the notebook may take to run in the browser (default 900)")
    args = ap.parse_args(argv)

    tut = _tutorials_module()
    if args.notebook.endswith(".ipynb") and Path(args.notebook).is_file():
        source = Path(args.notebook)   # any notebook, e.g. a small one to try the set-up
    else:
        matches = [p for p in tut.NOTEBOOKS if p.name.startswith(args.notebook)]
        if len(matches) != 1:
            ap.error(f"--notebook {args.notebook!r} matches {[p.name for p in matches]}")
        source = matches[0]
    try:
        import selenium  # noqa: F401
    except ImportError:
        ap.error('selenium is not installed: pip install -e ".[browser]"')
    for exe in (args.chromium, args.chromedriver):
        if not Path(exe).exists():
            ap.error(f"{exe} not found: apt-get install -y chromium chromium-driver")

    nb = tut.clear(nbformat.read(source, as_version=4))
    code_cells, figures = len(tut.code_cells(nb)), tut.figure_calls(nb)
    token, port = secrets.token_hex(24), _free_port()
    work = Path(tempfile.mkdtemp(prefix="toolkit-browser-"))
    root = work / "tutorials"
    root.mkdir()
    nbformat.write(nb, root / source.name)   # a cleared copy: the browser run writes only there
    out = Path(args.out)
    print(f"{source.name}: {code_cells} code cells, {figures} figures drawn by its code; "
          f"JupyterLab on 127.0.0.1:{port}", flush=True)
    log = open(work / "jupyter.log", "wb")
    jupyter = start_jupyter(root, work / "home", token, port, log)
    driver = None
    try:
        wait_for_jupyter(jupyter, port, token, timeout=120)
        driver = open_browser(args.chromium, args.chromedriver, work / "chromium-profile")
        driver.get(f"http://127.0.0.1:{port}/lab/tree/{source.name}?token={token}")
        seconds = run_all_from_the_menu(driver, code_cells, args.timeout)
        from selenium.webdriver.common.by import By

        errors = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type="
                                      "'application/vnd.jupyter.stderr'] .jp-RenderedText")
        tracebacks = [e for e in errors if "Traceback" in e.text or "Error" in e.text.split("\n")[0]]
        images = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
        pngs = [i for i in images if (i.get_attribute("src") or "").startswith("data:image/png")]
        print(f"ran in the browser in {seconds:.0f} s; {len(pngs)} figures shown "
              f"(the code draws {figures}); {len(tracebacks)} error outputs", flush=True)
        if tracebacks:
            raise RuntimeError(f"a cell raised in the browser:\n{tracebacks[0].text[:2000]}")
        if len(pngs) < max(figures, 1):
            raise RuntimeError(f"the browser shows {len(pngs)} figures, the code draws {figures}")
        cell = pngs[0].find_element(By.XPATH, "./ancestor::div[contains(@class,'jp-CodeCell')][1]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", cell)
        time.sleep(1)
        out.parent.mkdir(parents=True, exist_ok=True)
        cell.screenshot(str(out))
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"screenshot of the first figure cell: {out.relative_to(REPO) if out.is_relative_to(REPO) else out} "
              f"(load average {load})", flush=True)
    except Exception:
        log.flush()
        tail = (work / "jupyter.log").read_text(errors="replace")[-3000:]
        print(f"--- the end of JupyterLab's log:\n{tail}", file=sys.stderr)
        raise
    finally:
        if driver is not None:
            driver.quit()
        jupyter.terminate()
        try:
            jupyter.wait(timeout=30)
        except subprocess.TimeoutExpired:
            jupyter.kill()
            jupyter.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
