"""The explorer page (glue_attribution/explorer.py), driven in headless Chromium through selenium: every query
listed, a click shows its top examples in the order of the scores, the filter filters, hostile training text is
shown literally and runs nothing, and the page makes no network request. Skips where no browser is installed."""

import json
import re
import shutil

import numpy as np
import pytest
from datasets import Dataset

from glue_attribution import explorer

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> "quoted" & café ✓ </script>'


def dataset(texts: list, labels: list) -> Dataset:
    return Dataset.from_dict({"sentence": texts, "label": labels})


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    train = dataset([HOSTILE] + [f"training sentence {j}" for j in range(1, 40)], [j % 2 for j in range(40)])
    queries = dataset(["a fine film", "a dull film", "fine acting, dull plot", "nothing at all"], [1, 0, 1, 0])
    pairwise = rng.standard_normal((4, 40)).astype(np.float32)
    pairwise[1, 0] = 100.0  # the hostile example is query 1's most positive one
    predictions = {"predictions": np.array([1, 1, 1, 0]), "margins": np.array([2.0, -1.5, 0.3, 1.0]),
                   "correct": np.array([True, False, True, True])}
    data = explorer.explorer_data("sst2: test scores", "sst2", pairwise, queries, train, predictions,
                                  self_scores=rng.standard_normal(40), top_k=5)
    return data, pairwise


def test_data_embeds_only_what_the_page_shows(case):
    data, pairwise = case
    assert [q["index"] for q in data["queries"]] == [0, 1, 2, 3]
    assert [e["index"] for e in data["queries"][2]["positive"]] == np.argsort(-pairwise[2])[:5].tolist()
    assert [e["index"] for e in data["queries"][2]["negative"]] == np.argsort(pairwise[2])[:5].tolist()
    share = data["queries"][2]["positive"][0]["share"]
    assert share == pytest.approx(pairwise[2].max() / np.abs(pairwise[2]).sum())
    assert set(map(int, data["train"])) <= set(range(40)) and data["queries"][1]["correct"] is False
    page = explorer.render(data)
    assert "<script>window" not in page and "</script><img" not in page  # inline JSON cannot close its element
    payload = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(payload) == json.loads(json.dumps(data))


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium and chromedriver not installed: the page was not driven")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_page_in_a_real_browser(case, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    data, pairwise = case
    path = tmp_path / "explorer.html"
    explorer.write_explorer(str(path), data)
    assert explorer.add_lds(str(path), [0.5, -0.2, 0.1], "lds_x")  # evaluate_lds.py score's enrichment
    assert [q["lds"] for q in explorer.read_data(str(path))["queries"]] == [0.5, -0.2, 0.1, None]
    assert not explorer.add_lds(str(tmp_path / "none.html"), [0.5], "lds_x")
    browser.get(path.as_uri())
    items = browser.find_elements(By.CSS_SELECTOR, "#queries li")
    assert [int(li.get_attribute("data-index")) for li in items] == [0, 1, 2, 3]

    items[1].click()  # query 1: its top examples in the order of the scores, the hostile text shown as text
    rows = browser.find_elements(By.CSS_SELECTOR, "#positive tr[data-index]")
    assert [int(r.get_attribute("data-index")) for r in rows] == np.argsort(-pairwise[1])[:5].tolist()
    assert rows[0].find_elements(By.CSS_SELECTOR, "td")[-1].text == HOSTILE.strip()
    assert browser.execute_script("return window.pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#view img, #view script")
    assert "Query 1" in browser.find_element(By.ID, "view").text
    negatives = browser.find_elements(By.CSS_SELECTOR, "#negative tr[data-index]")
    assert [int(r.get_attribute("data-index")) for r in negatives] == np.argsort(pairwise[1])[:5].tolist()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#self tr[data-index]")) == 40

    browser.find_element(By.ID, "filter").send_keys("dull")
    assert [li.text.splitlines()[0] for li in browser.find_elements(By.CSS_SELECTOR, "#queries li")] == [
        "a dull film", "fine acting, dull plot"]
    browser.find_element(By.ID, "filter").send_keys(Keys.CONTROL, "a", Keys.DELETE)
    Select(browser.find_element(By.ID, "correct")).select_by_value("0")
    assert [li.get_attribute("data-index") for li in browser.find_elements(By.CSS_SELECTOR, "#queries li")] == ["1"]
    Select(browser.find_element(By.ID, "correct")).select_by_value("")
    Select(browser.find_element(By.ID, "sort")).select_by_value("lds")
    assert [li.get_attribute("data-index") for li in browser.find_elements(By.CSS_SELECTOR, "#queries li")] == [
        "1", "2", "0", "3"]  # lowest LDS first, none last
    assert "LDS -0.20" in browser.find_elements(By.CSS_SELECTOR, "#queries li")[0].text

    events = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert requested and all(url == path.as_uri() for url in requested), requested  # the page itself, nothing else
