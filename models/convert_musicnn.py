"""One-off tools around the MSD_musicnn port: convert the TF1 checkpoint, and make TensorFlow reference outputs.

Neither the project nor its tests need TensorFlow: these run once, by hand, and their outputs are committed
(``models/weights/msd_musicnn.npz`` + ``.json``, ``tests/models/fixtures/musicnn_reference.npz``). Steps:

1. ``pip download --no-deps musicnn==0.1.0`` and unzip the wheel (ISC licence; the checkpoint is the files
   ``musicnn/MSD_musicnn/.index`` and ``.data-00000-of-00001``, i.e. the prefix ``musicnn/MSD_musicnn/``).
2. A scratch venv outside the repo: ``python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
   tf-keras && /tmp/tfvenv/bin/pip install --no-deps musicnn==0.1.0``.
3. ``/tmp/tfvenv/bin/python models/convert_musicnn.py convert --checkpoint .../musicnn/MSD_musicnn/``
   writes the npz (one float32 array per PyTorch state_dict entry, TF kernels transposed) and the json (tags).
4. ``.venv/bin/python models/convert_musicnn.py inputs --out /tmp/in.npz [CLIP...]`` writes the inputs, made
   with the project's own :func:`models.musicnn.musicnn_log_mel` and :func:`~models.musicnn.musicnn_patches` (so
   both sides see the same input): always the synthetic ones of :data:`SYNTH_RECIPE` (``pipeline.synth`` clips
   at 16 kHz, seeded), plus the first ``--patches`` (default 1) 3 s patches of each real CLIP. Each input comes
   with its float32 bytes' sha256; this scratch file is never committed.
5. ``TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python models/convert_musicnn.py reference --checkpoint ...
   --inputs /tmp/in.npz --out tests/models/fixtures/musicnn_reference.npz`` (several ``--inputs`` files are
   merged) builds the package's own ``musicnn.models.define_model(..., "MSD_musicnn")`` as a TF1 graph with
   ``is_training=False``, restores every variable from the checkpoint by name (the Saver fails on any it does
   not find) and stores, per input, its taggram, penultimate, max_pool and mean_pool, the sha256 and the
   recipe (json), *not the input itself*: the test rebuilds the synthetic inputs from the recipe, and the real
   ones from the audio under ``MELSEARCH_REAL_AUDIO`` (GTZAN has no licence: no log-mel of its clips may be
   committed, only these few network outputs). (Not ``musicnn.extractor``: it casts the mel power to float16
   before the log, which overflows to inf on most real clips and wrecks the outputs.)

The commands that made the committed fixture (real clips from ``/work/shared/sample-audio``)::

    .venv/bin/python models/convert_musicnn.py inputs --out /tmp/in.npz --patches 1 \
        $A/classical/classical.00000.wav $A/metal/metal.00000.wav $A/hiphop/hiphop.00002.wav
    TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python models/convert_musicnn.py reference \
        --checkpoint /tmp/tfvenv/lib/python3.11/site-packages/musicnn/MSD_musicnn/ --inputs /tmp/in.npz \
        --out tests/models/fixtures/musicnn_reference.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("convert_musicnn")

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "weights" / "msd_musicnn.npz"
TAGS = ROOT / "models" / "weights" / "msd_musicnn.json"
OUTPUTS = ("taggram", "penultimate", "max_pool", "mean_pool")

# musicnn/configuration.py MSD_LABELS: the order of the 50 logits
MSD_LABELS = [
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s", "alternative rock",
    "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul", "indie rock", "Mellow",
    "electronica", "80s", "folk", "90s", "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient",
    "acoustic", "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country", "easy listening",
    "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb", "indie pop", "sad",
    "House", "happy",
]  # fmt: skip


def _bn(tf_name: str) -> dict[str, tuple[str, str]]:
    """A TF batch norm's four variables, keyed by their PyTorch names."""
    return {
        "weight": (f"{tf_name}/gamma", "copy"), "bias": (f"{tf_name}/beta", "copy"),
        "running_mean": (f"{tf_name}/moving_mean", "copy"), "running_var": (f"{tf_name}/moving_variance", "copy"),
    }  # fmt: skip


def _layer(conv: str, bn: str, kind: str) -> dict[str, tuple[str, str]]:
    """A conv and the batch norm after it: PyTorch suffix -> (TF variable, how to convert its array)."""
    out = {f"conv.{k}": (f"{conv}/{v}", kind if v == "kernel" else "copy") for k, v in (("weight", "kernel"),
                                                                                         ("bias", "bias"))}
    return out | {f"bn.{k}": v for k, v in _bn(bn).items()}


def variable_map() -> dict[str, tuple[str, str]]:
    """PyTorch state_dict name -> (TF1 checkpoint variable, conversion), in the order TF created them.

    ``tf.compat.v1.layers`` numbers its layers by creation: the input batch norm, then per front-end block a
    conv and its batch norm (timbral 38 and 67 bands, temporal 128, 64, 32 frames), the three mid-end convs,
    then the back-end's batch norm, dense, batch norm, dense.
    """
    names: dict[str, tuple[str, str]] = {f"bn_input.{k}": v for k, v in _bn("batch_normalization").items()}
    blocks = [("timbral.0", "conv2d"), ("timbral.1", "conv2d_1"), ("temporal.0", "conv2d_2"),
              ("temporal.1", "conv2d_3"), ("temporal.2", "conv2d_4")]
    for i, (prefix, conv) in enumerate(blocks, start=1):
        names |= {f"{prefix}.{k}": v for k, v in _layer(conv, f"batch_normalization_{i}", "conv2d").items()}
    for i in range(3):
        layer = _layer(f"conv2d_{5 + i}", f"batch_normalization_{6 + i}", "conv1d")
        names |= {f"midend.{i}.{k}": v for k, v in layer.items()}
    names |= {f"bn_pool.{k}": v for k, v in _bn("batch_normalization_9").items()}
    names |= {"dense.weight": ("dense/kernel", "dense"), "dense.bias": ("dense/bias", "copy")}
    names |= {f"bn_dense.{k}": v for k, v in _bn("batch_normalization_10").items()}
    names |= {"head.weight": ("dense_1/kernel", "dense"), "head.bias": ("dense_1/bias", "copy")}
    return names


def convert_array(value: np.ndarray, kind: str) -> np.ndarray:
    """One TF array in PyTorch's layout, float32.

    TF's NHWC input here is (B, time, mel, 1) and a conv2d kernel (k_time, k_mel, c_in, c_out); the port's
    input is (B, 1, mel, time), so a Conv2d weight is (c_out, c_in, k_mel, k_time): axes reversed. The mid-end
    convs span the whole feature axis, which the port treats as channels: Conv1d (c_out, c_in, k_time). Dense
    kernels are (in, out), Linear weights (out, in).
    """
    if kind == "conv2d":
        value = value.transpose(3, 2, 1, 0)  # (k_time, k_mel, c_in, c_out) -> (c_out, c_in, k_mel, k_time)
    elif kind == "conv1d":
        value = value[:, :, 0, :].transpose(2, 1, 0)  # (k_time, c_in, 1, c_out) -> (c_out, c_in, k_time)
    elif kind == "dense":
        value = value.T  # (in, out) -> (out, in)
    return np.ascontiguousarray(value, dtype=np.float32)


def convert(checkpoint: str, out: Path = WEIGHTS, tags: Path = TAGS) -> None:
    """Read the TF1 checkpoint prefix ``checkpoint`` and write the npz of PyTorch arrays and the tag json."""
    import tensorflow as tf

    reader = tf.compat.v1.train.NewCheckpointReader(checkpoint)
    shapes = reader.get_variable_to_shape_map()
    names = variable_map()
    used = {tf_name for tf_name, _ in names.values()}
    # everything else in the checkpoint is Adam's slots and step counters
    left = sorted(k for k in shapes if k not in used and "Adam" not in k and not k.startswith("beta"))
    if left:
        raise SystemExit(f"checkpoint variables the port does not use: {left}")
    arrays = {name: convert_array(reader.get_tensor(tf_name), kind) for name, (tf_name, kind) in names.items()}
    # PyTorch's batch norms also count batches; zero, as in a fresh module (unused in eval)
    for name in [n for n in names if n.endswith(".running_var")]:
        arrays[name.replace("running_var", "num_batches_tracked")] = np.zeros((), dtype=np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    meta = {
        "model": "MSD_musicnn",
        "source": "musicnn 0.1.0 (PyPI), musicnn/MSD_musicnn/ TF1 checkpoint, converted by models/convert_musicnn.py",
        "reference": "J. Pons, X. Serra, musicnn: pre-trained convolutional neural networks for music audio "
        "tagging, ISMIR 2019 LBD",
        "licence": "ISC, Copyright (c) Music Technology Group, Universitat Pompeu Fabra 2019 (see LICENSE-musicnn)",
        "input": {"sr": 16000, "n_fft": 512, "hop_length": 256, "n_mels": 96, "n_frames": 187,
                  "log": "log10(10000 * mel_power + 1)"},
        "tags": MSD_LABELS,
    }  # fmt: skip
    tags.write_text(json.dumps(meta, indent=1) + "\n")
    n_params = sum(a.size for a in arrays.values() if a.dtype == np.float32)
    log.info("wrote %s (%d arrays, %d floats) and %s", out, len(arrays), n_params, tags)


# The synthetic inputs of the fixture: pipeline.synth clips at 16 kHz, one seeded generator per input
# (default_rng([seed, index])), summed when several classes are named, peak-normalised, then musicnn's log-mel
# and its first patch of ``frames`` frames: the design size, one longer and one shorter than every temporal kernel.
SYNTH_RECIPE = {
    "seed": 2024, "sr": 16000, "peak": 0.8,
    "inputs": [
        {"name": "drone", "classes": ["drone"], "seconds": 3.0, "frames": 187},
        {"name": "chime", "classes": ["chime"], "seconds": 3.0, "frames": 187},
        {"name": "buzz", "classes": ["buzz"], "seconds": 3.0, "frames": 187},
        {"name": "bass+static", "classes": ["bass", "static"], "seconds": 3.0, "frames": 187},
        {"name": "whistle+buzz.T311", "classes": ["whistle", "buzz"], "seconds": 5.0, "frames": 311},
        {"name": "chime+drone.T50", "classes": ["chime", "drone"], "seconds": 1.0, "frames": 50},
    ],
}  # fmt: skip


def input_sha256(x: np.ndarray) -> str:
    """The sha256 of an input's float32 C-order bytes: the test checks it rebuilt the input TF saw, bit for bit."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def synthetic_inputs(recipe: dict | None = None) -> dict[str, np.ndarray]:
    """The inputs of ``recipe`` (default :data:`SYNTH_RECIPE`): name -> (1, 1, 96, frames) float32 log-mel."""
    sys.path.insert(0, str(ROOT))
    from models.musicnn import musicnn_log_mel, musicnn_patches
    from pipeline.synth import SYNTH_CLASSES, synth_clip

    recipe = recipe or SYNTH_RECIPE
    classes = {c.name: c for c in SYNTH_CLASSES}
    out = {}
    for index, item in enumerate(recipe["inputs"]):
        rng = np.random.default_rng([recipe["seed"], index])
        y = sum(synth_clip(classes[name], seconds=item["seconds"], sr=recipe["sr"], rng=rng).astype(np.float64)
                for name in item["classes"])  # fmt: skip
        y = (recipe["peak"] * y / np.abs(y).max()).astype(np.float32)
        out[item["name"]] = musicnn_patches(musicnn_log_mel(y, sr=recipe["sr"]), n_frames=item["frames"])[:1]
    return out


def real_inputs(path: Path, patches: int) -> dict[int, np.ndarray]:
    """Patch index -> (1, 1, 96, 187) float32 log-mel: the first ``patches`` 3 s patches of the whole clip ``path``."""
    sys.path.insert(0, str(ROOT))
    from models.musicnn import MUSICNN_MEL, musicnn_log_mel, musicnn_patches
    from pipeline.audio import load_audio

    y, _ = load_audio(path, sr=MUSICNN_MEL.sr)
    return {i: x[None] for i, x in enumerate(musicnn_patches(musicnn_log_mel(y))[:patches])}


def make_inputs(clips: list[Path], out: Path, *, patches: int) -> None:
    """The scratch npz of inputs for ``reference``: ``synth/<name>`` and ``real/<clip stem>/p<i>`` -> (1, 1, 96, T)
    float32, each with ``<key>/input_sha256``, and ``recipe`` (json: the synthetic recipe, the real clips' paths
    relative to their audio root ``<genre>/<file>``, and ``patches``)."""
    arrays: dict[str, np.ndarray] = {}
    for name, x in synthetic_inputs().items():
        arrays[f"synth/{name}"] = x
    real = {}
    for clip in clips:
        real[clip.stem] = f"{clip.parent.name}/{clip.name}"
        for i, x in real_inputs(clip, patches).items():
            arrays[f"real/{clip.stem}/p{i}"] = x
    for key in list(arrays):
        arrays[f"{key}/input_sha256"] = np.array(input_sha256(arrays[key]))
    recipe = {"synthetic": SYNTH_RECIPE, "real": {"clips": real, "patches": patches}}
    arrays["recipe"] = np.array(json.dumps(recipe, sort_keys=True))
    np.savez(out, **arrays)
    log.info("wrote %s: %s", out, {k: v.shape for k, v in arrays.items() if v.ndim == 4})


def reference(checkpoint: str, inputs: list[Path], out: Path) -> None:
    """Run the package's own TF1 graph (``is_training=False``) on every 4-d array of ``inputs``; save its outputs.

    The inputs themselves are *not* saved (the real ones are derived from unlicensed audio); every other array
    (sha256s, the recipe) is copied through.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    # run as a script, this file's folder comes first on sys.path, and its musicnn.py would shadow the package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from musicnn import models  # the package's graph definition, unchanged

    tf.compat.v1.disable_eager_execution()
    result: dict[str, np.ndarray] = {}
    arrays = {}
    for path in inputs:
        with np.load(path, allow_pickle=False) as npz:
            arrays |= {k: npz[k] for k in npz.files}
    for key, x in arrays.items():
        if x.ndim != 4:
            result[key] = x  # sha256, recipe
            continue
        n, _, n_mels, n_frames = x.shape
        graph = tf.Graph()
        with graph.as_default():
            # the package's layout: (batch, time, mel); a Python False fixes batch norm and dropout to inference
            ph = tf.compat.v1.placeholder(tf.float32, [None, n_frames, n_mels])
            logits, *_, mean_pool, max_pool, penultimate = models.define_model(ph, False, "MSD_musicnn", 50)
            ops = {"taggram": tf.nn.sigmoid(logits), "penultimate": penultimate, "max_pool": max_pool,
                   "mean_pool": mean_pool}  # fmt: skip
            with tf.compat.v1.Session() as sess:
                # no initializer: restore must set every variable, or reading it fails
                tf.compat.v1.train.Saver().restore(sess, checkpoint)
                got = sess.run(ops, feed_dict={ph: x[:, 0].transpose(0, 2, 1)})  # (N, T, 96)
        for name in OUTPUTS:
            result[f"{key}/{name}"] = got[name].astype(np.float32)
        top = np.argsort(-got["taggram"].mean(0))[:5]
        log.info("%s %s: top tags %s", key, x.shape, [MSD_LABELS[i] for i in top])
    assert not any(v.ndim == 4 for v in result.values())
    np.savez_compressed(out, **result)
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="TF1 checkpoint -> npz of PyTorch arrays + tag json")
    p.add_argument("--checkpoint", required=True, help="checkpoint prefix, e.g. .../musicnn/MSD_musicnn/")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p = sub.add_parser("inputs", help="synthetic inputs [+ clips] -> scratch npz of log-mel patches (project venv)")
    p.add_argument("clips", type=Path, nargs="*", help="real clips, as <audio root>/<genre>/<file>")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--patches", type=int, default=1, help="keep the first N patches of each clip")
    p = sub.add_parser("reference", help="npz of inputs -> npz of TF outputs, without the inputs (TF venv)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--inputs", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "convert":
        convert(args.checkpoint, args.out)
    elif args.command == "inputs":
        make_inputs(args.clips, args.out, patches=args.patches)
    else:
        reference(args.checkpoint, args.inputs, args.out)


if __name__ == "__main__":
    main()
