"""Qwen-VL checkpoints: a tiny Qwen-VL-Chat directory in the official layout loads with its
visual tower, the list format `<img>PATH</img>` becomes the 256-id span of the original tokenizer, and the tower's
256 vectors replace exactly the embeddings between the tags (qwen-family.md §6.4), through the engine's media
items: chunk boundaries inside the image and the prefix cache included."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from PIL import Image
from tiny import TINY_VISUAL, assert_cli_chat_gives_the_librarys_reply, encoder_info, write_qwen_vl

import qwen_engine
from qwen_engine.config import VisionConfig
from qwen_engine.engine.serving import Request
from qwen_engine.errors import QwenError
from qwen_engine.images import load_image, pixels
from qwen_engine.tokenizer import IncrementalDecoder

IMG, END, PAD = 151857, 151858, 151859


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory, gguf_arrays):
    directory = tmp_path_factory.mktemp("qwen-vl-chat")
    write_qwen_vl(directory, gguf_arrays[0])
    for i, colour in enumerate(((200, 30, 30), (20, 90, 220))):
        Image.new("RGB", (320, 200), colour).save(directory / f"picture{i}.png")
    return directory


@pytest.fixture(scope="module")
def vl(vl_dir):
    return qwen_engine.load(vl_dir, dtype="float32")


def first_logits(model, text: str, **engine_options) -> torch.Tensor:
    request = model.request(text, max_tokens=1, temperature=0)
    request.keep_logits = True
    engine = model.serving_engine(num_blocks=128, **engine_options)
    return engine.run([request])[request.request_id][0][0].logits


def by_hand(model, text: str, paths: list) -> torch.Tensor:
    """The original model's first forward: the ids' embeddings, the 256 rows strictly between each pair of tags
    replaced by that image's tower output."""
    ids = model.tokenizer.encode(text, special=True)
    with torch.inference_mode():
        hidden = model.decoder.embed(torch.tensor([ids]))
        for start, path in zip([i for i, t in enumerate(ids) if t == IMG], paths):
            hidden[0, start + 1 : start + 257] = model.vision(pixels(load_image(path).image)[None])[0]
        return model.decoder(inputs_embeds=hidden)[0, -1]


def test_a_qwen_vl_chat_directory_loads_with_its_tower(vl) -> None:
    assert vl.vision is not None and vl.config.vision == VisionConfig.from_dict(TINY_VISUAL)
    assert [vl.tokenizer.token_to_id(t) for t in ("<ref>", "<img>", "</img>", "<imgpad>")] == [151851, IMG, END, PAD]


def test_the_list_format_is_tokenized_as_the_original_tokenizer_does(vl, vl_dir) -> None:
    path = str(vl_dir / "picture0.png")
    ids = vl.tokenizer.encode(f"Picture 1: <img>{path}</img>\nWhat is it?", special=True)
    start, end = ids.index(IMG), ids.index(END)
    span = ids[start + 1 : end]
    assert len(span) == 256 and span[: len(path.encode())] == list(path.encode()) and set(span[len(path.encode()):]) == {PAD}
    assert IMG not in vl.tokenizer.encode(f"<img>{path}</img>")  # without special: text
    with pytest.raises(QwenError, match="255 bytes"):
        vl.tokenizer.encode("<img>" + "a" * 256 + "</img>", special=True)
    with pytest.raises(QwenError, match="no </img>"):
        vl.tokenizer.encode("<img>x.png", special=True)


@pytest.mark.parametrize("chunk", [2048, 100])  # 100: prompt chunks end inside the first image
def test_one_and_two_images_give_the_original_forward(vl, vl_dir, chunk: int) -> None:
    paths = [vl_dir / "picture0.png", vl_dir / "picture1.png"]
    one = f"Picture 1: <img>{paths[0]}</img>\nWhat colour is it?"
    two = f"Picture 1: <img>{paths[0]}</img>\nPicture 2: <img>{paths[1]}</img>\nWhich is red?"
    for text, images in ((one, paths[:1]), (two, paths)):
        expected = by_hand(vl, text, images)
        ours = first_logits(vl, text, prefill_tokens=chunk)
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (first_logits(vl, two) - first_logits(vl, two.replace("picture1", "picture0"))).abs().max() > 1e-3


def test_a_missing_image_is_one_clear_error(vl, vl_dir) -> None:
    with pytest.raises(QwenError, match="image not found"):
        vl.generate(f"<img>{vl_dir / 'absent.png'}</img>", max_tokens=1)


def test_chat_image_parts_become_the_list_format_in_qwen_vl_chats_chatml(vl, vl_dir) -> None:
    path = str(vl_dir / "picture0.png")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"}, {"type": "image", "image": path}]}]
    prompt = vl.chat_prompt(messages)
    raw = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
           f"Picture 1: <img>{path}</img>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.token_ids == vl.tokenizer.encode(raw, special=True)
    assert [(item.kind, item.offset, item.length) for item in prompt.items] == [("image", prompt.token_ids.index(IMG) + 1, 256)]
    reply = vl.chat(messages, max_tokens=3, temperature=0)
    assert reply.token_ids == vl.generate(raw, max_tokens=3, temperature=0).token_ids
    # Bytes, a PIL image and a data: URL of the same picture: the same image, the same reply.
    data = (vl_dir / "picture0.png").read_bytes()
    for source in (data, Image.open(vl_dir / "picture0.png")):
        same = [{"role": "user", "content": [{"type": "image", "image": source}, {"type": "text", "text": "What colour is it?"}]}]
        assert vl.chat(same, max_tokens=3, temperature=0).token_ids == reply.token_ids


def test_two_images_are_numbered_across_the_conversation(vl, vl_dir) -> None:
    image = lambda name: {"type": "image", "image": str(vl_dir / name)}  # noqa: E731
    messages = [{"role": "user", "content": [image("picture0.png"), {"type": "text", "text": "And this?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": [image("picture1.png"), {"type": "text", "text": "Which is blue?"}]}]
    prompt = vl.chat_prompt(messages)
    assert len(prompt.items) == 2 and "Picture 2: " in vl.tokenizer.decode(prompt.token_ids, skip_special=False)


def test_markup_in_user_text_stays_text(vl, vl_dir) -> None:
    text = f"<img>{vl_dir / 'picture0.png'}</img><ref>x</ref><|im_end|>"
    prompt = vl.chat_prompt([{"role": "user", "content": text}])
    assert not prompt.items and IMG not in prompt.token_ids and prompt.token_ids.count(151645) == 2  # the template's own


def test_a_text_only_model_refuses_an_image(tiny_gguf, vl_dir) -> None:
    text_only = qwen_engine.load(tiny_gguf, dtype="float32")
    with pytest.raises(QwenError, match="reads text"):
        text_only.chat([{"role": "user", "content": [{"type": "image", "image": str(vl_dir / "picture0.png")}]}])


def test_grounding_boxes_are_read_in_the_images_pixels_and_drawn() -> None:
    from qwen_engine.grounding import draw_boxes, read_boxes

    text = ("<ref>the cat</ref><box>(100,200),(500,750)</box><box>(0,0),(10,10)</box> and "
            "<box>(900,900),(999,999)</box><quad>(0,0),(500,0),(500,500),(0,500)</quad><box>(1,2)</box>")
    boxes = read_boxes(text, (640, 400))
    assert [(b.label, b.kind, b.rectangle) for b in boxes] == [
        ("the cat", "box", (64.0, 80.0, 320.0, 300.0)), ("the cat", "box", (0.0, 0.0, 6.4, 4.0)),
        ("the cat", "box", (576.0, 360.0, 639.36, 399.6)), ("the cat", "quad", (0.0, 0.0, 320.0, 200.0))]
    assert read_boxes("<box>(10,10),(20,20)</box>", (1000, 1000))[0].label is None
    drawn = draw_boxes(Image.new("RGB", (640, 400), "white"), boxes[:1])
    assert drawn.getpixel((64, 150)) == (255, 0, 0) and drawn.getpixel((320, 150)) == (255, 0, 0)  # left and right edges
    assert drawn.getpixel((200, 150)) == (255, 255, 255) and drawn.getpixel((30, 30)) == (255, 255, 255)


def test_replies_keep_the_grounding_markup(vl) -> None:
    """Output text keeps <ref>/<box> (so replies can be read for boxes), drops the other control tokens."""
    ids = vl.tokenizer.encode("<ref>a</ref><box>(1,2),(3,4)</box><imgpad><|im_end|>", special=True)
    assert vl.tokenizer.decode(ids) == "<ref>a</ref><box>(1,2),(3,4)</box>"
    decoder = IncrementalDecoder(vl.tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "<ref>a</ref><box>(1,2),(3,4)</box>"


def test_qwen_chat_with_an_image_gives_the_librarys_reply(vl, vl_dir, capsys, monkeypatch) -> None:
    assert_cli_chat_gives_the_librarys_reply(vl, vl_dir, "image", str(vl_dir / "picture0.png"), capsys, monkeypatch)


def test_qwen_chat_image_errors_are_one_line(vl_dir, tiny_gguf, capsys) -> None:
    from qwen_engine import cli

    assert cli.main(["chat", "--model", str(vl_dir), "--image", str(vl_dir / "absent.png"), "--once", "Hi"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [f"qwen: error: image not found: {vl_dir / 'absent.png'}"]
    assert cli.main(["chat", "--model", str(tiny_gguf), "--image", str(vl_dir / "picture0.png"), "--once", "Hi"]) != 0
    assert "reads text" in capsys.readouterr().err


def test_the_server_takes_data_url_images_and_refuses_the_rest(vl, vl_dir, tiny_gguf) -> None:
    import base64

    import openai
    from test_server import Running

    data = (vl_dir / "picture0.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()

    def ask(client, *urls: str, stream: bool = False):
        content = [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "What?"}]
        return client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=[{"role": "user", "content": content}],
                                              max_tokens=3, temperature=0, stream=stream)

    expected = vl.chat([{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "What?"}]}],
                       max_tokens=3, temperature=0).text
    running = Running(vl)
    try:
        client = running.client()
        assert ask(client, url).choices[0].message.content == expected
        assert "".join(c.choices[0].delta.content or "" for c in ask(client, url, stream=True) if c.choices) == expected
        for bad, message in (("https://example.com/cat.png", "remote image URLs are not fetched.*--allow-remote-media"),
                             (str(vl_dir / "picture0.png"), "image paths are not read.*--allowed-local-media-path"),
                             (f"file://{vl_dir / 'picture0.png'}", "image paths are not read"),
                             ("data:image/png;base64,AAAA", "not an image"), ("data:image/png,raw", "base64")):
            with pytest.raises(openai.BadRequestError, match=message):
                ask(client, bad)
        with pytest.raises(openai.BadRequestError, match="holds 5 images; .* at most 4 .*--limit-mm-per-prompt"):
            ask(client, *[url] * 5)
        for prompt, message in ((f"<img>{vl_dir / 'picture0.png'}</img>What?", "image paths are not read"), ("<img>x.png", "no </img>")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.completions.create(model="qwen2.5-coder-0.5b-instruct", prompt=prompt, max_tokens=1)
        # <img> in a user's chat text is text: no file is read, the reply is the library's for the same text.
        text = f"<img>{vl_dir / 'picture0.png'}</img> What?"
        served = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", max_tokens=3, temperature=0,
                                                messages=[{"role": "user", "content": text}])
        assert served.choices[0].message.content == vl.chat([{"role": "user", "content": text}], max_tokens=3, temperature=0).text
        assert ask(client, url).choices[0].message.content == expected  # still serving
    finally:
        running.close()
    text_only = Running(qwen_engine.load(tiny_gguf, dtype="float32"))
    try:
        with pytest.raises(openai.BadRequestError, match="reads text"):
            ask(text_only.client(), url)
    finally:
        text_only.close()


def list_prompts(vl_dir) -> list[tuple[str, list]]:
    paths = [vl_dir / "picture0.png", vl_dir / "picture1.png"]
    return [(f"Picture 1: <img>{paths[0]}</img>\nWhat colour is it?", paths[:1]),
            (f"Picture 1: <img>{paths[0]}</img>\nPicture 2: <img>{paths[1]}</img>\nWhich is red?", paths)]


def coloured(directory, *colours) -> list:
    paths = []
    for colour in colours:
        paths.append(directory / f"{'-'.join(map(str, colour))}.png")
        Image.new("RGB", (180, 240), colour).save(paths[-1])
    return paths


def test_logits_take_the_list_format(vl, vl_dir) -> None:
    for text, paths in list_prompts(vl_dir):
        got = vl.logits(text)
        assert got.shape == (len(vl.tokenizer.encode(text, special=True)), vl.config.vocab_size)
        expected = by_hand(vl, text, paths)
        assert (got[-1] - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(vl.logits("Hello"), vl.logits(vl.tokenizer.encode("Hello")))


def test_an_image_seen_again_skips_its_encoder(vl, tmp_path, monkeypatch) -> None:
    """Encoder outputs are kept by the image's digest (a small LRU): the same bytes under another name hit too."""
    monkeypatch.setattr("qwen_engine.llm.ENCODER_CACHE_ITEMS", 2)
    a, b, c = coloured(tmp_path, (10, 200, 10), (200, 200, 10), (10, 200, 200))
    again = tmp_path / "again.png"
    again.write_bytes(a.read_bytes())
    calls = []
    vl._encoded.clear()
    handle = vl.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        counts = []
        for path in (a, a, again, b, c, a, c):
            vl.generate(f"<img>{path}</img>What?", max_tokens=1)
            counts.append(len(calls))
        assert counts == [1, 1, 1, 2, 3, 4, 4]  # a is dropped for c (two kept), then encoded again
    finally:
        handle.remove()
        vl._encoded.clear()


def test_preemption_keeps_image_prompts_output(vl, tmp_path) -> None:
    """Too few blocks for three one-image prompts: running ones are preempted and recomputed, each image encoded
    once, and every output is the one the prompt gets alone."""
    texts = [f"Picture 1: <img>{path}</img>\nWhat is it?" for path in coloured(tmp_path, (90, 0, 0), (0, 90, 0), (0, 0, 90))]
    options = dict(max_tokens=20, temperature=0, ignore_eos=True)
    alone = [vl.generate(text, **options).token_ids for text in texts]
    vl._encoded.clear()
    calls, preempted = [], []
    handle = vl.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        engine = vl.serving_engine(num_blocks=35)  # 17 blocks a prompt, 18 at its longest: two fit, then not
        engine.on_step = lambda step, _: preempted.extend(step.preempted)
        requests = [vl.request(text, **options) for text in texts]
        results = engine.run(requests)
    finally:
        handle.remove()
        vl._encoded.clear()
    assert preempted and len(calls) == 3
    assert [[e.token_id for e in results[r.request_id][0]] for r in requests] == alone


def test_qwen_info_describes_the_tower(vl, vl_dir, capsys) -> None:
    tower, line = encoder_info(vl_dir, "vision_tower", capsys)
    assert (tower["layers"], tower["width"], tower["output_dim"]) == (2, 48, 128)
    assert tower["parameters"] == sum(p.numel() for p in vl.vision.parameters())  # the catalog's count, as loaded
    assert "2 layers × 48 (4 heads, MLP 120)" in line and f"{tower['parameters']:,} parameters" in line


def test_qwen_generate_takes_the_list_format(vl, vl_dir, capsys) -> None:
    from qwen_engine import cli

    for text, _ in list_prompts(vl_dir):
        expected = vl.generate(text, max_tokens=3, temperature=0).text
        assert cli.main(["generate", "--model", str(vl_dir), "--dtype", "float32", "--max-tokens", "3",
                         "--temperature", "0", text]) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_every_bad_image_is_one_line(vl_dir, tmp_path, capsys) -> None:
    from qwen_engine import cli

    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    encoded = io.BytesIO()
    noise.save(encoded, format="PNG")
    (tmp_path / "truncated.png").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("1", (8000, 7000)).save(tmp_path / "huge.png")  # 56 MP, a few kB on disk
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(deep / "long.png")
    (tmp_path / "folder.png").mkdir()
    for name, message in (("truncated.png", "not a readable image; it may be truncated"),
                          ("folder.png", "cannot read the image"),
                          ("notes.png", "is not an image this engine can read"),
                          ("huge.png", "8000×7000 pixels, over the limit of 50,000,000"),
                          (deep / "long.png", "255 bytes")):
        path = tmp_path / name
        assert cli.main(["chat", "--model", str(vl_dir), "--image", str(path), "--once", "Hi"]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qwen: error: ") and message in lines[0], lines


def test_draw_boxes_writes_the_replys_boxes_on_the_image(vl, vl_dir, tmp_path, capsys, monkeypatch) -> None:
    """The reply is scripted at the sampler (a random model draws no boxes); the rest is the real path: the reply's
    text, its boxes in the image's pixels (320×200: x·0.32, y·0.2), the drawing and its atomic write."""
    from qwen_engine import cli
    from qwen_engine.engine.runner import ModelRunner

    reply = "<ref>it</ref><box>(100,200),(500,750)</box>"
    script = vl.tokenizer.encode(reply, special=True) + [vl.tokenizer.token_to_id("<|im_end|>")]
    monkeypatch.setattr(ModelRunner, "sample", lambda self, seq, logits: script[len(seq.output_ids)])
    target = tmp_path / "boxes.png"
    assert cli.main(["chat", "--model", str(vl_dir), "--image", str(vl_dir / "picture0.png"), "--draw-boxes",
                     str(target), "--once", "Where is it?"]) == 0
    assert capsys.readouterr().out == reply + "\n" and [p.name for p in tmp_path.iterdir()] == ["boxes.png"]
    drawn = Image.open(target).convert("RGB")
    assert drawn.size == (320, 200)
    for edge in ((32, 100), (160, 100), (96, 40), (96, 150)):  # left, right, top and bottom edges
        assert drawn.getpixel(edge) == (255, 0, 0), edge
    assert drawn.getpixel((96, 100)) == drawn.getpixel((250, 180)) == (200, 30, 30)  # inside and outside: the image


def test_the_operators_media_policy(vl, vl_dir, tmp_path) -> None:
    """--allow-remote-media fetches (here from a server on 127.0.0.1); --allowed-local-media-path reads files under
    its directory only (`..` and symlinks cannot leave it), raw prompts' <img>PATH</img> included; every limit is a
    400 naming its flag, and the server keeps serving through them all."""
    import base64
    import functools
    import http.server
    import threading

    import openai
    from test_server import Running

    from qwen_engine.server.media import MediaPolicy

    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    data = (vl_dir / "picture0.png").read_bytes()
    (root / "sub" / "cat.png").write_bytes(data)
    outside = tmp_path / "secret.png"
    outside.write_bytes(data)
    (root / "link.png").symlink_to(outside)
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(root / "noise.png")  # ~12 kB: over the byte limit
    Image.new("RGB", (300, 300), "white").save(root / "wide.png")  # 90,000 pixels: over the pixel limit
    assert len(data) < 4000 < (root / "noise.png").stat().st_size

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}"
    inline = lambda path: "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()  # noqa: E731

    def ask(client, *urls: str) -> str:
        content = [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "What?"}]
        return client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=[{"role": "user", "content": content}],
                                              max_tokens=3, temperature=0).choices[0].message.content

    expected = vl.chat([{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "What?"}]}],
                       max_tokens=3, temperature=0).text
    policy = MediaPolicy(allow_remote=True, local_root=root.resolve(), per_prompt={"image": 2}, max_bytes=4000,
                         max_pixels=70_000)
    running = Running(vl, media=policy)
    try:
        client = running.client()
        for url in (f"{remote}/sub/cat.png", "sub/cat.png", f"file://{root}/sub/cat.png", str(root / "sub" / ".." / "sub" / "cat.png")):
            assert ask(client, url) == expected, url
        for url, message in ((str(root / ".." / "secret.png"), "leads outside"), ("../secret.png", "leads outside"),
                             (str(root / "link.png"), "leads outside"), (str(outside), "leads outside"),
                             (f"file://{outside}", "leads outside"), ("sub/absent.png", "no image file"),
                             (f"{remote}/absent.png", "HTTP 404"), (f"{remote}/noise.png", "over 4,000 bytes.*--max-image-mb"),
                             (inline(root / "noise.png"), "--max-image-mb"), ("noise.png", "--max-image-mb"),
                             (inline(root / "wide.png"), "300×300 pixels, over the limit of 70,000"),
                             ("wide.png", "300×300 pixels")):
            with pytest.raises(openai.BadRequestError, match=message):
                ask(client, url)
        with pytest.raises(openai.BadRequestError, match="holds 3 images; .* at most 2"):
            ask(client, *[inline(root / "sub" / "cat.png")] * 3)
        text = f"Picture 1: <img>{root}/sub/cat.png</img>\nWhat?"
        served = client.completions.create(model="qwen2.5-coder-0.5b-instruct", prompt=text, max_tokens=3, temperature=0)
        assert served.choices[0].text == vl.generate(text, max_tokens=3, temperature=0).text
        with pytest.raises(openai.BadRequestError, match="leads outside"):
            client.completions.create(model="qwen2.5-coder-0.5b-instruct", prompt=f"<img>{outside}</img>", max_tokens=1)
        assert ask(client, inline(root / "sub" / "cat.png")) == expected  # still serving
    finally:
        running.close()
        files.shutdown()


def test_serve_media_flags_are_checked_before_loading(capsys, tmp_path) -> None:
    from qwen_engine import cli
    from qwen_engine.cli import _media_limits

    assert _media_limits("image=2") == {"image": 2} and _media_limits('{"image": 0, "audio": 1}') == {"image": 0, "audio": 1}
    for bad in ("image", "video=1", "image=-1", '{"image": "x"}'):
        with pytest.raises(SystemExit):
            cli.main(["serve", "--limit-mm-per-prompt", bad])
        assert "not a media limit" in capsys.readouterr().err
    for flags, message in ((["--allowed-local-media-path", str(tmp_path / "absent")], "is not a directory"),
                           (["--max-image-mb", "0"], "--max-image-mb must be positive")):
        assert cli.main(["serve", "--model", str(tmp_path / "never-loaded"), *flags]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qwen: error: ") and message in lines[0], lines


class Planted:
    """Unpickling this would create a file: a weights file must never run code."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_in_pytorch_bin_shards_loads_the_same(vl, vl_dir, tmp_path) -> None:
    """Qwen-VL-Chat ships `pytorch_model-0000N-of-0000M.bin` shards: read with weights_only, memory-mapped."""
    import shutil

    from safetensors.torch import load_file

    state = load_file(vl_dir / "model.safetensors")
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, members in shards.items():
        torch.save({name: state[name] for name in members}, tmp_path / file)
    weight_map = {name: file for file, members in shards.items() for name in members}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "qwen.tiktoken"):
        shutil.copy(vl_dir / name, tmp_path / name)
    text = list_prompts(vl_dir)[1][0]
    assert torch.equal(qwen_engine.load(tmp_path, dtype="float32").logits(text), vl.logits(text))
    marker = tmp_path / "ran"
    torch.save({"x": Planted(marker)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(QwenError, match="cannot read .*pytorch_model-00002-of-00002.bin .*not a PyTorch weights file"):
        qwen_engine.load(tmp_path, dtype="float32")
    assert not marker.exists()
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(QwenError, match="truncated, corrupt"):
        qwen_engine.load(tmp_path, dtype="float32")


def test_the_prefix_cache_tells_images_apart_by_their_bytes(vl, tmp_path) -> None:
    """The same path (so the same ids) holding other bytes on the next request: the blocks before the image are
    reused, none from the image on, and the logits are those of the new picture."""
    path = coloured(tmp_path, (250, 250, 250))[0]
    text = f"Some words before the picture, enough to fill a block or two of the cache. Picture 1: <img>{path}</img>\nWhat?"
    engine = vl.serving_engine(num_blocks=128)

    def run() -> torch.Tensor:
        request = vl.request(text, max_tokens=1, temperature=0)
        request.keep_logits = True
        return engine.run([request])[request.request_id][0][0].logits

    run()
    Image.new("RGB", (180, 240), (0, 0, 0)).save(path)
    before = engine.stats()["prefix_hit_tokens"]
    changed = run()
    image_at = vl.tokenizer.encode(text, special=True).index(IMG) + 1
    assert 0 < engine.stats()["prefix_hit_tokens"] - before <= image_at
    expected = by_hand(vl, text, [path])
    assert (changed - expected).abs().max() <= 1e-4 * expected.abs().max()
