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
    members = [pairwise + 0.01 * rng.standard_normal(pairwise.shape), rng.standard_normal(pairwise.shape)]
    tokens = {1: {0: [[None, "[CLS]", 0.5], [0, HOSTILE, 2.0], [0, "café", -1.0]]}}  # query 1's top example
    data = explorer.explorer_data("sst2: test scores", "sst2", pairwise, queries, train, predictions,
                                  self_scores=rng.standard_normal(40), top_k=5, tokens=tokens, members=members)
    return data, pairwise, members


def test_data_embeds_only_what_the_page_shows(case):
    data, pairwise, members = case
    assert [q["index"] for q in data["queries"]] == [0, 1, 2, 3]
    for q, query in enumerate(data["queries"]):  # members' agreement: counted against each member's own top 5
        tops = [set(np.argsort(-m[q])[:5].tolist()) for m in members]
        counts = [sum(e["index"] in t for t in tops) for e in query["positive"]]
        assert [e["members"] for e in query["positive"]] == counts
        assert query["stability"] == pytest.approx(np.mean(counts) / 2)
    assert data["queries"][1]["positive"][0]["words"][1] == [0, HOSTILE, 2.0]
    assert "words" not in data["queries"][0]["positive"][0]
    assert [e["index"] for e in data["queries"][2]["positive"]] == np.argsort(-pairwise[2])[:5].tolist()
    assert [e["index"] for e in data["queries"][2]["negative"]] == np.argsort(pairwise[2])[:5].tolist()
    share = data["queries"][2]["positive"][0]["share"]
    assert share == pytest.approx(pairwise[2].max() / np.abs(pairwise[2]).sum())
    assert set(map(int, data["train"])) <= set(range(40)) and data["queries"][1]["correct"] is False
    harm = -(pairwise / pairwise.std(axis=1, keepdims=True)).sum(axis=0)  # minus standardised influence, summed
    assert [e["index"] for e in data["harm"]] == np.argsort(-harm, kind="stable").tolist()
    assert [e["score"] for e in data["harm"]] == pytest.approx(np.sort(harm)[::-1], rel=1e-5)
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

    data, pairwise, _ = case
    path = tmp_path / "explorer.html"
    explorer.write_explorer(str(path), data)
    flipped = np.zeros(40, dtype=bool)
    flipped[[3, 7]] = True
    suspicion = {"ekfac": np.arange(40.0)[::-1], "aum": np.arange(40.0)}  # ekfac ranks 0 first, aum 39 first
    assert explorer.add_detection(str(path), suspicion, flipped, 0.1)  # detect_mislabeled.py's enrichment
    assert not explorer.add_detection(str(tmp_path / "none.html"), suspicion, flipped, 0.1)
    assert explorer.add_lds(str(path), [0.5, -0.2, 0.1], "lds_x")  # evaluate_lds.py score's enrichment
    assert [q["lds"] for q in explorer.read_data(str(path))["queries"]] == [0.5, -0.2, 0.1, None]
    assert not explorer.add_lds(str(tmp_path / "none.html"), [0.5], "lds_x")
    browser.get(path.as_uri())
    items = browser.find_elements(By.CSS_SELECTOR, "#queries li")
    assert [int(li.get_attribute("data-index")) for li in items] == [0, 1, 2, 3]

    items[1].click()  # query 1: its top examples in the order of the scores, the hostile text shown as text
    rows = browser.find_elements(By.CSS_SELECTOR, "#positive tr[data-index]")
    assert [int(r.get_attribute("data-index")) for r in rows] == np.argsort(-pairwise[1])[:5].tolist()
    assert rows[0].find_elements(By.CSS_SELECTOR, "td")[-1].text == f"[CLS] {HOSTILE.strip()} café"
    assert browser.execute_script("return window.pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#view img, #view script")
    assert "Query 1" in browser.find_element(By.ID, "view").text
    negatives = browser.find_elements(By.CSS_SELECTOR, "#negative tr[data-index]")
    assert [int(r.get_attribute("data-index")) for r in negatives] == np.argsort(pairwise[1])[:5].tolist()
    shaded = rows[0].find_elements(By.CSS_SELECTOR, "td span.w")  # the hostile example's words, shaded
    assert [w.text for w in shaded] == ["[CLS]", HOSTILE.strip(), "café"]
    assert "rgba(40, 160, 70" in shaded[1].get_attribute("style") and "210, 50, 50" in shaded[2].get_attribute("style")
    assert rows[0].find_elements(By.CSS_SELECTOR, "td")[5].text == f"{data['queries'][1]['positive'][0]['members']}/2"
    self_rows = browser.find_elements(By.CSS_SELECTOR, "#self tr[data-index]")
    assert len(self_rows) == 40
    by_index = {int(r.get_attribute("data-index")): [td.text for td in r.find_elements(By.CSS_SELECTOR, "td")]
                for r in self_rows}
    assert by_index[3][5:8] == ["flipped", "\u25cf 4", "37"] and by_index[0][5:8] == ["", "\u25cf 1", "40"]
    assert by_index[39][5:8] == ["", "40", "\u25cf 1"]
    harm_rows = browser.find_elements(By.CSS_SELECTOR, "#harm tr[data-index]")  # by harm, with text and flags
    assert [int(r.get_attribute("data-index")) for r in harm_rows] == [e["index"] for e in data["harm"]]
    first = [td.text for td in harm_rows[0].find_elements(By.CSS_SELECTOR, "td")]
    j = data["harm"][0]["index"]
    assert first[4] == data["train"][str(j)]["label"] and first[-1] == data["train"][str(j)]["texts"][0].strip()
    assert first[5] == ("flipped" if j in (3, 7) else "") and first[6] == ("\u25cf " if j < 4 else "") + str(j + 1)

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

    browser.set_window_size(420, 900)  # a narrow window: one column, nothing wider than the window
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.set_window_size(1280, 900)

    events = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert requested and all(url == path.as_uri() for url in requested), requested  # the page itself, nothing else
