"""hfi-label: a small web app where people label generated images for HFI (binary or ranking feedback).

    hfi-label IMAGE_DIR --feedback FEEDBACK_DIR [--mode binary|ranking] [--m 5] [--concept TEXT]
              [--reference DIR] [--host 127.0.0.1] [--port N]

A thin Gradio front end over `sdd.feedback.FeedbackStore`, which validates and stores every answer. An
annotator logs in with a name; binary mode shows one image, its prompt and "Does this image show <concept>?"
with Yes / No / Skip (keys y / n / s); ranking mode shows a set of M images with a rank 1..M or X each (Enter
submits). Coming back under the same name continues where the annotator stopped.

The server serves only the images of IMAGE_DIR and the reference folder, in place (never copied elsewhere):
the feedback folder is blocked, uploads are refused, Gradio's own temporary folder is a fresh private one, and
nothing is sent home (analytics off, no external fonts).
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import time

import argparse  # noqa: E402
import atexit  # noqa: E402
import html  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from sdd.errors import UserError, run_main  # noqa: E402
from sdd.feedback import EXCLUDED, FeedbackStore, Item, unit_key, validate_annotator  # noqa: E402

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# Keys answer without the mouse. Keys typed into a text field (the login name) are left alone, and a held key
# does not repeat an answer. Each key clicks the visible button, so it goes through the same checks as a click.
SHORTCUTS_HEAD = """
<script>
(() => {
  const KEYS = {y: "hfi-yes", n: "hfi-no", s: "hfi-skip", enter: "hfi-submit"};
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || e.isComposing) return;
    const t = e.target;
    if (t && (t.isContentEditable || t.tagName === "TEXTAREA" ||
              (t.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(t.type)))) return;
    const id = KEYS[(e.key || "").toLowerCase()];
    const button = id && document.getElementById(id);
    if (button && button.offsetParent !== null && !button.disabled) {
      e.preventDefault();
      button.click();
    }
  });
})();
</script>
"""


def reference_images(folder: Optional[str]) -> list[str]:
    """Image files directly in the reference folder (sorted), refusing symlinks that point out of it."""
    if not folder:
        return []
    if not os.path.isdir(folder):
        raise UserError(f"--reference {folder}: no such folder")
    root = os.path.realpath(folder)
    paths = []
    for name in sorted(os.listdir(root)):
        if not name.lower().endswith(REFERENCE_SUFFIXES) or name.startswith("."):
            continue
        path = os.path.realpath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:
            raise UserError(f"--reference {folder}: {name} points outside the folder")
        if os.path.isfile(path):
            paths.append(path)
    if not paths:
        raise UserError(f"--reference {folder}: no images ({', '.join(REFERENCE_SUFFIXES)}) in it")
    return paths


def _key(unit: Optional[Sequence[Item]]) -> str:
    return "\n".join(unit_key(unit)) if unit else ""


def _error(err: Exception) -> str:
    return f"**Not saved:** {html.escape(str(err))}"


def build_app(store: FeedbackStore, references: Sequence[str] = ()):
    """The Gradio Blocks of the labelling app (not launched). All checks and storage are the store's."""
    import gradio as gr

    ranking = store.mode == "ranking"
    n = store.m if ranking else 1
    concept = html.escape(store.concept or "the target concept")
    # Events share one worker: a double press is handled after the first one, against the state it left.
    queue = dict(concurrency_limit=1, concurrency_id="hfi-answer")

    with gr.Blocks(title="HFI labelling", analytics_enabled=False) as demo:
        gr.Markdown(f"## HFI labelling: {concept}")
        st_annotator = gr.State(None)
        st_current = gr.State("")  # the unit on screen, server side: the browser never names files to store

        with gr.Column(visible=True) as login_box:
            name = gr.Textbox(label="Your name", placeholder="e.g. alice", elem_id="hfi-name", max_lines=1)
            start = gr.Button("Start", variant="primary", elem_id="hfi-start")
            login_msg = gr.Markdown(elem_id="hfi-login-message")

        with gr.Column(visible=False) as main_box:
            with gr.Row():
                who = gr.Markdown(elem_id="hfi-annotator")
                progress = gr.Markdown(elem_id="hfi-progress")
            gr.Markdown(f"### {html.escape(store.question)}")
            message = gr.Markdown(elem_id="hfi-message")
            # What the page shows, sent back with each answer: an answer to an image the page no longer
            # shows (a second key press before the next image arrived) is dropped.
            shown = gr.Textbox(visible=False)
            with gr.Column() as work_box:
                prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="hfi-prompt", max_lines=3)
                images, ranks, captions = [], [], []
                with gr.Row():
                    for i in range(1, n + 1):
                        with gr.Column(min_width=120):
                            images.append(
                                gr.Image(
                                    label=f"Image {i}" if ranking else "Image",
                                    type="filepath",
                                    interactive=False,
                                    height=260 if ranking else 512,
                                    buttons=["fullscreen"],
                                    elem_id=f"hfi-image-{i}",
                                )
                            )
                            if ranking:
                                captions.append(gr.Markdown(elem_id=f"hfi-caption-{i}"))
                                ranks.append(
                                    gr.Radio(
                                        [str(r) for r in range(1, n + 1)] + [EXCLUDED],
                                        label=f"Rank of image {i}",
                                        elem_id=f"hfi-rank-{i}",
                                    )
                                )
                if ranking:
                    submit = gr.Button("Submit ranking (Enter)", variant="primary", elem_id="hfi-submit")
                    gr.Markdown(f"1 = shows {concept} most, {n} = least; X = leave the image out. No ties.")
                else:
                    with gr.Row():
                        yes = gr.Button("Yes (y)", variant="primary", elem_id="hfi-yes")
                        no = gr.Button("No (n)", variant="stop", elem_id="hfi-no")
                        skip = gr.Button("Skip (s)", elem_id="hfi-skip")
            if references:
                with gr.Accordion(f"Reference images of {concept}", open=False):
                    gr.Gallery(value=list(references), columns=6, height="auto", interactive=False)

        outputs = [login_box, login_msg, main_box, who, progress, message, shown, work_box, prompt, *images]
        outputs += [*captions, *ranks, st_annotator, st_current]

        def render(annotator: str, note: str = "") -> dict:
            unit, done, total = store.status(annotator)
            noun = "sets ranked" if ranking else "labelled"
            out = {
                login_box: gr.update(visible=False),
                login_msg: "",
                main_box: gr.update(visible=True),
                who: f"Annotator: **{html.escape(annotator)}**",
                progress: f"**{done} / {total} {noun}**",
                st_annotator: annotator,
                st_current: _key(unit),
                shown: _key(unit),
                work_box: gr.update(visible=unit is not None),
            }
            if unit is None:
                what = f"{total} sets are ranked" if ranking else f"{total} images are labelled"
                out[message] = f"{note}\n\n**All {what}: thank you, {html.escape(annotator)}!** You can close this tab."
                for image in images:
                    out[image] = None
                return out
            out[message] = note
            same_prompt = len({item.prompt for item in unit}) == 1
            out[prompt] = gr.update(value=unit[0].prompt if same_prompt else "(differs per image: see captions)")
            for i, item in enumerate(unit):
                out[images[i]] = item.path
                if ranking:
                    out[captions[i]] = "" if same_prompt else html.escape(item.prompt)
                    out[ranks[i]] = gr.update(value=None)
            return out

        def login(raw_name: str):
            try:
                annotator = validate_annotator(raw_name)
            except UserError as err:
                return {login_msg: html.escape(str(err))}
            return render(annotator)

        def answer(annotator, current, shown_key, store_it) -> dict:
            if not annotator:  # the server restarted under an open page: its session is gone
                return {
                    login_box: gr.update(visible=True),
                    login_msg: "Please log in again: the app was restarted.",
                    main_box: gr.update(visible=False),
                }
            if not current or shown_key != current:
                return render(annotator)  # stale: the page showed another unit; store nothing
            if tuple(current.split("\n")) in store.answered(annotator):
                return render(annotator, "That one was already answered (another tab?); here is the next.")
            try:
                store_it(current.split("\n"))
            except UserError as err:
                return {message: _error(err)}  # nothing stored; the page keeps the annotator's choices
            return render(annotator)

        start.click(login, [name], outputs, **queue)
        name.submit(login, [name], outputs, **queue)

        if ranking:

            def submit_ranking(annotator, current, shown_key, *chosen):
                return answer(
                    annotator, current, shown_key, lambda files: store.answer_ranking(annotator, files, chosen)
                )

            submit.click(submit_ranking, [st_annotator, st_current, shown, *ranks], outputs, **queue)
        else:
            for button, label in ((yes, "yes"), (no, "no"), (skip, "skip")):

                def answer_label(annotator, current, shown_key, label=label):
                    return answer(
                        annotator,
                        current,
                        shown_key,
                        lambda files: store.answer_binary(annotator, files[0], label),
                    )

                button.click(answer_label, [st_annotator, st_current, shown], outputs, **queue)
    return demo


def serve(
    store: FeedbackStore,
    references: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    block: bool = True,
):
    """Build and launch the app. With ``block=False`` it returns the running Blocks (``.local_url``, ``.close()``)."""
    import gradio as gr

    # A private temporary folder, so the file route never reaches another Gradio app's files in /tmp/gradio.
    # Gradio reads it when the app and its components are created, hence before build_app.
    temp_dir = tempfile.mkdtemp(prefix="hfi-label-")
    atexit.register(shutil.rmtree, temp_dir, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = temp_dir
    served = [store.image_dir] + sorted({os.path.dirname(p) for p in references})
    gr.set_static_paths(served)  # served in place, not copied to a cache
    demo = build_app(store, references)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=not block,
            allowed_paths=served,
            # the answers, and the metadata whose method / model columns could bias an annotator
            blocked_paths=[store.feedback_dir, os.path.join(store.image_dir, "metadata.jsonl")],
            max_file_size=0,  # nothing here takes uploads
            head=SHORTCUTS_HEAD,
            theme=gr.themes.Default(),  # local fonts only
            ssr_mode=False,
            footer_links=[],
            mcp_server=False,
            pwa=False,
            enable_monitoring=False,
            quiet=not block,
        )
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port}: {err}") from None
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfi-label", description="Collect human feedback on generated images (HFI).")
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="imagefolder: metadata.jsonl + images")
    p.add_argument("--feedback", required=True, metavar="FEEDBACK_DIR", help="where feedback.jsonl is appended")
    p.add_argument("--mode", choices=["binary", "ranking"], default="binary")
    p.add_argument("--m", type=int, default=5, help="images per ranking set (ranking mode)")
    p.add_argument("--concept", default=None, help="the concept asked about, e.g. nudity")
    p.add_argument("--reference", default=None, metavar="DIR", help="reference images of the concept")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.m < 2:
        raise UserError(f"--m {args.m}: a ranking set needs at least 2 images")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected 1..65535")
    store = FeedbackStore(args.image_dir, args.feedback, mode=args.mode, concept=args.concept, m=args.m)
    references = reference_images(args.reference)
    serve(store, references, host=args.host, port=args.port, block=True)


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
