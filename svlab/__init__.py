"""svlab: the library under the lab's files (``train.py``, ``EER.py``, ``dataset.py`` and the models).

The lab's files tell the story; the machinery they share lives here, one fact per module.

Configuration, files and errors
``config``          load and validate ``config.yaml`` (the schema: every key, its default and choices)
``yaml_files``      reading YAML within limits (aliases, size, nesting; backslashes in double quotes)
``errors``          the user-fixable errors every command reports in one line
``files``           write-then-rename for every file the project writes; outputs never replace inputs;
                    unreadable indexes kept aside by name
``text``            printing outside text (file names, checkpoint fields) escaped and short
``safe_update``     results folders swapped in whole, never left half old, half new
``guard``           around every command: one line for an error or Ctrl-C/SIGTERM, escaped output

Data (under ``dataset.py``)
``manifests``       manifests and trial lists, and the cheap checks of the data folders
``audio``           reading audio (any format, rate and channel count) with one-line problems
``features``        the front ends (MFCC, fbank; librosa), ``feature_dim`` and the settings' signature
``feature_cache``   features computed once in parallel and cached on disk, augmented copies
``feature_store``   training and test features in sharded Kaldi ark/scp, written as extracted, read a crop at a time
``npz_cache``       the feature caches' .npz files, checksummed and read without trusting their headers
``process_pool``    worker processes that stop at once with whatever stops the command
``augment``         noise, reverberation, speed and SpecAugment
``online_augment``  augmentation per training crop in the DataLoader workers; MUSAN / RIR folders
``kaldi_data``      Kaldi data folders as manifests (wav.scp, utt2spk, segments); xvector.ark/.scp out
``demo_corpus``     the embedded synthetic corpus used when no real data is configured
``corpora``         finding a corpus on disk (AISHELL-1 and other layouts) for ``tools/prepare_data.py``
``corpora_split``   choosing speakers, building trial lists, writing manifests
``corpora_config``  pointing ``config.yaml`` at prepared manifests (``--write_config``)

Training (under ``train.py``)
``models``          build the embedding network and the loss head by name; the one module that
                    imports the model files (``xvector.py``, ``ecapa.py``, ``pooling.py``, ``loss.py``)
``nets``            the field's networks as model files of the package: ResNet34, CAM++
``checkpoint``      self-describing checkpoints, loaded with ``weights_only=True``; run folder names
``training``        precision, learning-rate schedule, stop signals, divergence checks, torch.compile
``run_folder``      what a training run writes (checkpoints, log, curves) and resumes from
``validation``      speakers held apart from training, their EER after every epoch, the best epoch
``distributed``     DistributedDataParallel (torchrun) helpers
``cpu_runtime``     CPU allocator and vector-math settings for fast, reproducible training

Evaluation (under ``EER.py``)
``embedding``       embeddings of features and audio files; device choice
``metrics``         EER, minDCF, actual DCF, Cllr
``confidence``      95 % intervals of the EER and minDCF: a bootstrap over the test speakers
``scoring``         cosine / PLDA scoring of trial pairs, AS-norm
``backend``         PLDA and the back-end files
``calibration``     score calibration to log-likelihood ratios
``scoring_system``  the scoring options and the back-ends fitted for a checkpoint
``evaluation``      evaluation folders, their index, and the files an evaluation writes
``report``          the run report: one self-contained printable page, its PDF, markdown
``report_content``  what the report shows: the printed log lines, print-size figures, a verify example
``report_text``     the report's words in English and Chinese
``chromium``        headless Chromium: the report's PDF (and the tests' screenshots)
``plots``           training curves, ROC, DET and score histograms (for the screen, and for print)

Using a trained model (``from svlab import SpeakerEncoder``; docs/api.md)
``encoder``         ``SpeakerEncoder``: embeddings, cosine scores and decisions from a .pth (PyTorch) or an
                    .onnx export (onnxruntime, torch never imported); the pretrained model's loader
``onnx_export``     ONNX export of every network, feature settings and threshold in its metadata
``embedding_files`` the embedding files (.npy + _index.txt) and command-line model paths, torch-free

Teaching and the command line
``lab_steps``       the handout's steps and their marked regions in the lab's files
``student_kit``     the students' version of the project (``svlab student-kit``)
``cli``             the ``svlab`` console script (``pip install -e .``) and ``python -m svlab``: its
                    subcommands run the project's tools (docs/cli.md)

Nothing is imported here eagerly: ``import svlab`` stays cheap, and the model files stay optional
for modules that do not build a network. ``SpeakerEncoder`` is looked up on first use (PEP 562).
"""


def __getattr__(name: str):
    """``svlab.SpeakerEncoder`` / ``svlab.Verification``, imported on first use (torch-free)."""
    if name in ("SpeakerEncoder", "Verification"):
        import importlib
        return getattr(importlib.import_module("svlab.encoder"), name)
    raise AttributeError(f"module 'svlab' has no attribute {name!r}")
