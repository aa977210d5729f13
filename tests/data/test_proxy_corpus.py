"""The proxy pre-training corpus: disjoint from synth-pedes, generic captions, deterministic, cached."""
import json
import re

import numpy as np
import pytest

from trpr.data.proxy_corpus import (CORPUS_VERSION, CorpusSpec, attribute_phrase, benchmark_identity_keys, corpus_folder,
                               corpus_identities, ensure_corpus, generate_corpus, load_corpus, write_alt_text)
from trpr.data.synthetic import PRESETS, sample_identities, write_caption

TINY = CorpusSpec(train_ids=12, heldout_ids=4, images_per_id=2, captions_per_image=2, image_size=32, seed=5)


def test_no_corpus_identity_shares_a_key_with_any_synth_pedes_preset():
    keys = benchmark_identity_keys()
    for name, spec in PRESETS.items():  # every preset's identities are in the exclusion set
        preset_keys = {i.key() for i in sample_identities(spec.train_ids + spec.val_ids + spec.test_ids, 0)}
        assert preset_keys <= keys, name
    identities = corpus_identities(CorpusSpec(train_ids=1000, heldout_ids=0, seed=7))
    assert len({i.key() for i in identities}) == 1000
    assert not {i.key() for i in identities} & keys


def test_exclusion_really_removes_a_colliding_identity():
    # with the benchmark's own seed the first draws ARE benchmark identities: excluding them must skip them
    first = sample_identities(5, 0)
    filtered = sample_identities(5, 0, exclude=frozenset(i.key() for i in first[:3]))
    assert [i.key() for i in filtered[:2]] == [i.key() for i in first[3:5]]
    with pytest.raises(ValueError, match="seed"):
        corpus_identities(CorpusSpec(seed=0))


def test_alt_text_is_short_generic_and_truthful():
    rng = np.random.default_rng(3)
    identities = sample_identities(200, 11)
    benchmark_openings = re.compile(r"^(a|an|the|this) .*(wearing|is wearing|has on|in) ", re.IGNORECASE)
    lengths = []
    for identity in identities:
        text = write_alt_text(identity, rng)
        assert text == text.lower() and not text.endswith(".")
        assert not benchmark_openings.match(text), text  # not one of the benchmark's four sentence templates
        lengths.append(len(text.split()))
        # every colour word in the caption belongs to the person (no invented attributes)
        own = {identity.upper_colour, identity.lower_colour, identity.shoe_colour, identity.hair_colour}
        if identity.hat != "none":
            own.add(identity.hat_colour)
        if identity.bag != "none":
            own.add(identity.bag_colour)
        synonyms = {"gray": "grey", "khaki": "beige", "tan": "beige", "violet": "purple"}
        for word in re.findall(r"[a-z]+", text):
            colour = synonyms.get(word, word)
            if colour in {"red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "grey",
                          "brown", "beige", "blonde"}:
                assert colour in own, (text, identity)
    assert np.mean(lengths) < 12  # alt text, far shorter than the benchmark's sentences
    benchmark = [len(write_caption(i, rng).split()) for i in identities]
    assert np.mean(lengths) < 0.7 * np.mean(benchmark)


def test_attribute_phrase_names_the_garment_colour():
    identity = sample_identities(1, 2)[0]
    phrase = attribute_phrase(identity, "upper", np.random.default_rng(0))
    assert phrase.split()[0] in {identity.upper_colour, "gray", "khaki", "tan", "violet"}


def test_corpus_is_deterministic_cached_and_loads(tmp_path):
    first = generate_corpus(tmp_path / "a", TINY, progress=False)
    again = generate_corpus(tmp_path / "b", TINY, progress=False)
    assert (first / "images.npy").read_bytes() == (again / "images.npy").read_bytes()
    assert (first / "corpus.json").read_text() == (again / "corpus.json").read_text()
    corpus = load_corpus(first)
    assert corpus.images.shape == (16 * 2, 32, 32, 3) and corpus.images.dtype == np.uint8
    assert len(corpus.indices("train")) == 24 and len(corpus.indices("heldout")) == 8
    assert all(len(c) == 2 for c in corpus.captions)
    assert corpus.identity[corpus.indices("heldout")].min() == 12
    info = json.loads((first / "corpus_info.json").read_text())
    assert info["corpus_version"] == CORPUS_VERSION and info["train_ids"] == 12
    # the cache: a complete folder is reused, its name encodes the settings
    folder = ensure_corpus(TINY, tmp_path, progress=False)
    assert folder == corpus_folder(TINY, tmp_path) and "ids12+4x2" in folder.name and "seed5" in folder.name
    stamp = (folder / "images.npy").stat().st_mtime_ns
    assert ensure_corpus(TINY, tmp_path, progress=False) == folder
    assert (folder / "images.npy").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_load_corpus_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.npy"):
        load_corpus(tmp_path)
