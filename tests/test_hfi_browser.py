"""The labelling app in a real browser: log in, label by click and by key, rank (one invalid ranking first).

Runs the app on a free localhost port (in a thread of this process) and drives Debian's headless Chromium with
Playwright's sync API; then checks what feedback.jsonl holds. Skipped when /usr/bin/chromium, playwright or
gradio is missing. ``HFI_SCREENSHOT=docs/hfi-label.png`` also saves a screenshot of ranking mode there.
"""

import json
import os
import socket

import pytest
from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (pip install -e '.[label]')")
pytest.importorskip("gradio", reason="the labelling app needs gradio (pip install -e '.[label]')")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from hfi.label_app import serve  # noqa: E402
from sdd.feedback import FeedbackStore, read_records  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # gradio's own pandas deprecations
]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
WAIT_MS = 20_000  # an answer round-trips in well under a second; this only bounds a hang on a loaded machine


def make_image_folder(folder, prompts, size=96):
    """An imagefolder (metadata.jsonl + PNGs) of simple drawn scenes, one colour and shape per image."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i, prompt in enumerate(prompts):
            image = Image.new("RGB", (size, size), (235 - 20 * i, 225, 205 + 7 * i))
            draw = ImageDraw.Draw(image)
            box = (size // 5 + 2 * i, size // 4, size - size // 5, size - size // 6 - i)
            (draw.ellipse if "cat" in prompt else draw.rectangle)(box, fill=(60 + 25 * i, 90, 150 - 12 * i))
            name = f"{i:04d}.png"
            image.save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "prompt": prompt, "seed": i, "method": "sdd"}) + "\n")
    return str(folder)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def app(monkeypatch):
    """Start the app for a store; the page records every request that leaves localhost."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # serve() points it at a private folder; restored afterwards
    running = []

    def start(store, references=()):
        demo = serve(store, references, host="127.0.0.1", port=free_port(), block=False)
        running.append(demo)
        return demo.local_url.rstrip("/")

    yield start
    for demo in running:
        demo.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    page.outside = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else page.outside.append(r.url))
    page.goto(url)
    return page


def log_in(page, name):
    page.locator("#hfi-name textarea, #hfi-name input").first.fill(name)
    page.keyboard.press("Enter")  # Enter in the name field logs in (and is not taken for a shortcut)


def test_binary_labelling_by_click_and_key(browser, app, tmp_path):
    images = make_image_folder(tmp_path / "gen", ["a cat", "a cat", "a dog", "a cat"])
    refs = make_image_folder(tmp_path / "refs", ["a cat", "a cat"])
    store = FeedbackStore(images, str(tmp_path / "fb"), mode="binary", concept="cats")
    url = app(store, [os.path.join(refs, "0000.png"), os.path.join(refs, "0001.png")])
    page = open_page(browser, url)

    log_in(page, "../eve")
    expect(page.locator("#hfi-login-message")).to_contain_text("annotator")
    log_in(page, "alice")
    progress = page.locator("#hfi-progress")
    expect(progress).to_have_text("0 / 4 labelled")
    expect(page.locator("#hfi-prompt textarea, #hfi-prompt input").first).to_have_value("a cat")
    expect(page.get_by_text("Does this image show cats?")).to_be_visible()

    page.locator("#hfi-yes").click()
    expect(progress).to_have_text("1 / 4 labelled")
    page.keyboard.press("n")
    expect(progress).to_have_text("2 / 4 labelled")
    expect(page.locator("#hfi-prompt textarea, #hfi-prompt input").first).to_have_value("a dog")  # image 3
    # served straight from IMAGE_DIR, not from a copy elsewhere
    src = f"{url}/gradio_api/file={os.path.realpath(images)}/0002.png"
    expect(page.locator("#hfi-image-1 img")).to_have_attribute("src", src)
    page.keyboard.press("s")
    expect(progress).to_have_text("3 / 4 labelled")

    page.get_by_text("Reference images of cats").click()  # the accordion opens on the reference images
    expect(page.locator(f"img[src*='{os.path.realpath(refs)}/000']")).to_have_count(2)

    page.reload()  # coming back: continues at image 4
    log_in(page, "alice")
    expect(progress).to_have_text("3 / 4 labelled")
    page.keyboard.press("y")
    expect(page.locator("#hfi-message")).to_contain_text("All 4 images are labelled")
    expect(page.locator("#hfi-yes")).to_be_hidden()

    records, problems = read_records(store.path)
    assert problems == []
    assert [(r["annotator"], r["image"], r["label"]) for r in records] == [
        ("alice", "0000.png", "yes"), ("alice", "0001.png", "no"), ("alice", "0002.png", "skip"),
        ("alice", "0003.png", "yes"),
    ]
    assert [r["prompt"] for r in records] == ["a cat", "a cat", "a dog", "a cat"]

    (tmp_path / "secret.png").write_bytes((tmp_path / "gen" / "0000.png").read_bytes())
    for path in (
        store.path,  # the answers
        os.path.join(images, "metadata.jsonl"),
        "/etc/passwd",
        str(tmp_path / "secret.png"),  # beside IMAGE_DIR
        f"{images}/%2E%2E/secret.png",  # encoded, so the client cannot collapse the ".."
    ):
        assert page.request.get(f"{url}/gradio_api/file={path}").status == 403, path
    assert page.request.get(f"{url}/gradio_api/file={os.path.realpath(images)}/0000.png").status == 200
    assert page.outside == []  # no fonts, analytics or anything else from outside
    page.close()


def test_ranking_rejects_a_tie_then_stores_a_valid_ranking(browser, app, tmp_path):
    images = make_image_folder(tmp_path / "gen", ["a painting of a cat"] * 5 + ["a dog"] * 2, size=160)
    refs = make_image_folder(tmp_path / "refs", ["a cat"])
    store = FeedbackStore(images, str(tmp_path / "fb"), mode="ranking", concept="cats", m=5)
    url = app(store, [os.path.join(refs, "0000.png")])
    page = open_page(browser, url)
    log_in(page, "bob")
    progress = page.locator("#hfi-progress")
    expect(progress).to_have_text("0 / 2 sets ranked")

    def rank(i, value):
        page.locator(f"#hfi-rank-{i} input[value='{value}']").check()

    for i, value in enumerate(["1", "3", "4", "X", "2"], 1):
        rank(i, value)
    if os.environ.get("HFI_SCREENSHOT"):  # for the README: a set ranked, about to be submitted
        page.screenshot(path=os.environ["HFI_SCREENSHOT"], full_page=True)
    rank(3, "3")  # a tie: 3 twice
    page.locator("#hfi-submit").click()
    expect(page.locator("#hfi-message")).to_contain_text("ties are not allowed")
    assert read_records(store.path) == ([], [])  # nothing stored
    expect(progress).to_have_text("0 / 2 sets ranked")
    expect(page.locator("#hfi-rank-2 input[value='3']")).to_be_checked()  # the choices are kept to fix

    rank(3, "4")
    page.keyboard.press("Enter")  # focus is on the radio just chosen: Enter submits
    expect(progress).to_have_text("1 / 2 sets ranked")
    expect(page.locator("#hfi-message")).to_have_text("")
    expect(page.locator("#hfi-rank-1 input[value='1']")).not_to_be_checked()  # the next set starts blank

    (record,), problems = read_records(store.path)
    assert problems == []
    assert record["annotator"] == "bob" and record["mode"] == "ranking" and record["concept"] == "cats"
    assert record["images"] == [f"{i:04d}.png" for i in range(5)] and record["seeds"] == [0, 1, 2, 3, 4]
    assert record["ranking"] == [1, 3, 4, "X", 2]
    assert page.outside == []
    page.close()
