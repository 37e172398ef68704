"""The explorer page (glue_attribution/explorer.py), driven in headless Chromium through selenium: every query
listed, a click shows its top examples in the order of the scores, the filter filters queries and training examples,
a training example's view lists the queries whose top-k lists it is in, the address opens a given query, the list is
one Tab stop, a narrow window scrolls to the view, hostile training text is shown literally and runs nothing, and the
page makes no network request; its data lives in explorer.json beside it. Skips where no browser is installed."""

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
    saved = json.loads((tmp_path / "explorer.json").read_text())  # the data beside the page, the page drawn from it
    assert saved["lds_ground_truth"] == "lds_x" and "detection" in saved
    assert path.read_text() == explorer.render(saved)
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
        "a dull film", "fine acting, dull plot", "training examples on this page: 0"]
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
    Select(browser.find_element(By.ID, "sort")).select_by_value("index")

    events = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert requested and all(url == path.as_uri() for url in requested), requested  # the page itself, nothing else


def test_a_page_without_its_data_is_left_alone(case, tmp_path, caplog):
    """A page written before explorer.json existed is never parsed: the scripts that add to it say how to write both
    again, and leave it as it was."""
    path = tmp_path / "explorer.html"
    path.write_text(explorer.render(case[0]))
    before = path.read_text()
    assert not explorer.add_lds(str(path), [0.5, -0.2, 0.1, 0.0], "lds_x")
    assert path.read_text() == before and not (tmp_path / "explorer.json").exists()
    assert "has no explorer.json beside it" in caplog.text and "rerun the analyze.py command" in caplog.text
    (tmp_path / "explorer.json").write_text("{")
    with pytest.raises(explorer.GlueError, match="explorer.json is damaged; rerun the analyze.py command"):
        explorer.read_data(str(path))


def texts(browser, selector: str) -> list:
    return [r.text for r in browser.find_elements("css selector", selector)]


def test_training_view_address_and_keyboard(case, browser, tmp_path):
    """A training example's view (the queries whose top-k lists it is in, each side by score), the examples in the
    most lists, the filter finding training examples, `#query=N` / `#train=J` in the address, and the list as one
    Tab stop whose focus mark differs from the selection."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    data, pairwise, _ = case
    path = tmp_path / "explorer.html"
    explorer.write_explorer(str(path), data)
    browser.set_window_size(1280, 900)
    browser.get(path.as_uri() + "#query=2")  # the address opens on query 2, selected in the list
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == "Query 2"
    assert browser.find_element(By.CSS_SELECTOR, '#queries li[aria-selected="true"]').get_attribute("data-index") == "2"

    lists = {}  # training index -> {side: [(query, score)]}, from the data
    for q in data["queries"]:
        for side in ("positive", "negative"):
            for e in q[side]:
                lists.setdefault(e["index"], {"positive": [], "negative": []})[side].append((q["index"], e["score"]))
    counts = sorted(((-len(v["positive"]) - len(v["negative"]), j) for j, v in lists.items()))
    influencers = browser.find_elements(By.CSS_SELECTOR, "#influencers tr[data-index]")
    assert [int(r.get_attribute("data-index")) for r in influencers] == [j for _, j in counts[:20]]
    assert influencers[0].find_elements(By.CSS_SELECTOR, "td")[2].text == str(-counts[0][0])

    j = data["queries"][2]["positive"][0]["index"]  # a click on a training example opens its view
    browser.find_element(By.CSS_SELECTOR, f'#positive tr[data-index="{j}"] a').click()
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == f"Training example {j}"
    assert browser.execute_script("return location.hash") == f"#train={j}"
    raised = [int(r.get_attribute("data-query")) for r in browser.find_elements(By.CSS_SELECTOR,
                                                                                 "#train-positive tr[data-query]")]
    assert raised == [q for q, _ in sorted(lists[j]["positive"], key=lambda p: -p[1])] and 2 in raised
    lowered = [int(r.get_attribute("data-query")) for r in browser.find_elements(By.CSS_SELECTOR,
                                                                                  "#train-negative tr[data-query]")]
    assert lowered == [q for q, _ in sorted(lists[j]["negative"], key=lambda p: p[1])]
    total = len(lists[j]["positive"]) + len(lists[j]["negative"])
    assert f"in the top-5 lists of {total} of 4 queries" in browser.find_element(By.ID, "view").text
    browser.find_element(By.CSS_SELECTOR, "#train-positive tr[data-query] a").click()  # and back to a query
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == f"Query {raised[0]}"
    browser.back()
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == f"Training example {j}"

    shown = sorted(int(k) for k in data["train"] if data["train"][k]["texts"][0].startswith("training sentence 1"))
    browser.find_element(By.ID, "filter").send_keys("training sentence 1")  # the filter finds training examples
    found = browser.find_elements(By.CSS_SELECTOR, '#queries li[data-kind="train"]')
    assert sorted(int(li.get_attribute("data-index")) for li in found) == shown and shown
    first = found[0].get_attribute("data-index")
    found[0].click()
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == f"Training example {first}"
    browser.find_element(By.ID, "filter").send_keys(Keys.CONTROL, "a", Keys.DELETE)

    browser.get(path.as_uri() + f"#train={j}")
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == f"Training example {j}"
    items = browser.find_elements(By.CSS_SELECTOR, "#queries li")  # one Tab stop; arrows move, Enter selects
    assert [li.get_attribute("tabindex") for li in items] == ["0", "-1", "-1", "-1"]
    browser.find_element(By.ID, "sort").send_keys(Keys.TAB)
    active = lambda: browser.switch_to.active_element.get_attribute("data-index")  # noqa: E731
    assert active() == "0"
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN)
    assert active() == "2"
    focused = browser.switch_to.active_element
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == "Query 2"
    browser.switch_to.active_element.send_keys(Keys.ARROW_UP)
    style = "const s = getComputedStyle(arguments[0]); return [s.outlineStyle, s.outlineWidth, s.backgroundColor];"
    ring, _, _ = browser.execute_script(style, browser.switch_to.active_element)  # focus: a ring; selection: a fill
    assert ring == "solid" and browser.execute_script(style, browser.switch_to.active_element)[1] == "3px"
    selected = browser.execute_script(style, focused)
    assert selected[0] == "none" and selected[2] != browser.execute_script(style, items[0])[2]
    browser.switch_to.active_element.send_keys(Keys.TAB)  # one press leaves the list
    assert browser.switch_to.active_element.tag_name != "li"


def test_page_at_scale(browser, tmp_path):
    """872 queries x 8,192 training examples, a few examples in most top-10 lists (as on SST-2): the page stays
    small and fast; one number format per column; on a 420 px window a click scrolls to the view and the text column
    keeps the width of the window."""
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(1)
    pairwise = rng.standard_normal((872, 8192)).astype(np.float32)
    pairwise[:, 7] += 4.0  # in (nearly) every query's positive top 10
    pairwise[:, 11] = rng.choice([-6.0, 6.0], 872)  # in every list, on one side or the other
    pairwise *= 1e3  # scores of 1e3..1e4: fixed and scientific would mix without one format per column
    words = "the a movie film plot actor scene story music ending cast script was is very quite rather".split()
    sentence = lambda i: " ".join(words[(i * k) % len(words)] for k in range(1, 8)) + f" {i}"  # noqa: E731
    train = dataset([sentence(i) for i in range(8192)], [i % 2 for i in range(8192)])
    queries = dataset([sentence(i) for i in range(872)], [i % 2 for i in range(872)])
    predictions = {"predictions": np.arange(872) % 2, "margins": rng.standard_normal(872),
                   "correct": rng.random(872) > 0.1}
    data = explorer.explorer_data("sst2: scale", "sst2", pairwise, queries, train, predictions)
    path = tmp_path / "explorer.html"
    explorer.write_explorer(str(path), data)
    assert path.stat().st_size < 3e6
    browser.set_window_size(1280, 900)
    browser.get(path.as_uri() + "#query=500")
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == "Query 500"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#queries li")) == 872
    top = browser.find_elements(By.CSS_SELECTOR, "#influencers tr[data-index]")
    assert [r.get_attribute("data-index") for r in top[:2]] == ["11", "7"]
    assert top[0].find_elements(By.CSS_SELECTOR, "td")[2].text == "872"
    for table in ("positive", "negative", "harm", "influencers"):  # one number format per column
        for column in range(2, 4):
            cells = texts(browser, f"#{table} tr[data-index] td:nth-child({column + 1})")
            assert len({"e" in c for c in cells}) == 1, (table, column, cells)
    elapsed = browser.execute_script(
        "const t = performance.now(); document.querySelector('#influencers a').click(); return performance.now() - t;")
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == "Training example 11" and elapsed < 2000
    assert len(browser.find_elements(By.CSS_SELECTOR, "#train-positive tr[data-query]")) == 100  # the first 100 shown

    browser.set_window_size(420, 900)
    browser.get(path.as_uri())
    browser.find_elements(By.CSS_SELECTOR, "#queries li")[3].click()
    assert browser.find_element(By.CSS_SELECTOR, "#view h2").text == "Query 3"
    view_top = browser.execute_script("return document.getElementById('view').getBoundingClientRect().top")
    assert 0 <= view_top < 50  # scrolled to the view, not left below 45vh of list
    widths = browser.execute_script("return [...document.querySelectorAll('#positive td.text')]"
                                    ".map((td) => td.getBoundingClientRect().width / window.innerWidth)")
    assert min(widths) > 0.7, widths
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(tmp_path / "narrow.png"))
    browser.set_window_size(1280, 900)
