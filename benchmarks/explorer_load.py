"""How an explorer page behaves in headless Chromium: its size, the time until it is rendered, and the time a click
on a query takes to show that query's examples. Prints one JSON line.

    python benchmarks/explorer_load.py runs/full_results/sst2/scores_ekfac_index_k16/explorer.html --screenshot p.png
"""

import argparse
import json
import os
import shutil
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page")
    parser.add_argument("--screenshot", default=None, help="Save a screenshot after the click")
    parser.add_argument("--query", type=int, default=3, help="Which query to click (position in the list)")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        start = time.time()
        driver.get("file://" + os.path.abspath(args.page))
        items = driver.find_elements(By.CSS_SELECTOR, "#queries li")
        loaded = time.time() - start
        timing = driver.execute_script("const t = performance.timing; return t.loadEventEnd - t.navigationStart;")
        start = time.time()
        items[args.query].click()
        driver.find_element(By.CSS_SELECTOR, "#view table")
        clicked = time.time() - start
        if args.screenshot:
            driver.save_screenshot(args.screenshot)
        print(json.dumps({"page_bytes": os.path.getsize(args.page), "queries_listed": len(items),
                          "load_seconds": round(loaded, 3), "load_event_ms": timing,
                          "click_seconds": round(clicked, 3)}))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
