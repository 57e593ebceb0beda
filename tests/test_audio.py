"""Audio helpers: WAV I/O and PyAV resampling."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from stream.audio import AudioFileError, Resampler, read_wav, resample, rms_dbfs, write_wav


def tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def test_resample_keeps_duration_and_pitch():
    out = resample(tone(440, 22050, 1.0), 22050, 16000)
    assert abs(len(out) - 16000) <= 32
    assert abs(dominant_frequency(out, 16000) - 440) < 5


def test_streaming_resampler_matches_whole_signal():
    signal = tone(300, 48000, 0.5)
    resampler = Resampler(48000, 16000)
    pieces = [resampler.push(signal[i : i + 960]) for i in range(0, len(signal), 960)] + [resampler.flush()]
    streamed = np.concatenate(pieces)
    whole = resample(signal, 48000, 16000)
    assert len(streamed) == len(whole)
    assert np.max(np.abs(streamed.astype(int) - whole.astype(int))) <= 1


def test_wav_round_trip(tmp_path):
    samples = tone(1000, 16000, 0.25)
    write_wav(tmp_path / "t.wav", samples, 16000)
    back, rate = read_wav(tmp_path / "t.wav")
    assert rate == 16000 and np.array_equal(back, samples)
    assert rms_dbfs(np.zeros(100, np.int16)) == float("-inf")
    assert abs(rms_dbfs(samples) - 20 * np.log10(8000 / 32768 / np.sqrt(2))) < 0.1


@pytest.mark.parametrize(("bits", "encoding"), [(24, "signed-integer"), (32, "signed-integer"), (32, "floating-point")])
def test_wav_files_that_are_not_16_bit_are_read_too(tmp_path, bits, encoding):
    """A 32-bit or float WAV (WAVE_FORMAT_EXTENSIBLE, which Python's wave module refuses) is decoded by PyAV."""
    source = tmp_path / "tone16.wav"
    tone = (np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 10000).astype(np.int16)
    write_wav(source, tone, 16000)
    other = tmp_path / f"tone{bits}.wav"
    subprocess.run(["sox", str(source), "-b", str(bits), "-e", encoding, str(other)], check=True)
    samples, rate = read_wav(other)
    assert rate == 16000 and abs(len(samples) - len(tone)) <= 32
    assert np.abs(samples[:15000].astype(np.int32) - tone[:15000]).max() < 10


def test_a_file_that_is_not_sound_is_one_clear_error(tmp_path):
    (tmp_path / "notes.wav").write_text("not a sound file")
    with pytest.raises(AudioFileError, match=r"notes\.wav: not a sound file"):
        read_wav(tmp_path / "notes.wav")
    with pytest.raises(AudioFileError, match="no such file"):
        read_wav(tmp_path / "missing.wav")
