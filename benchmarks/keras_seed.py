"""Keras 3 (TensorFlow backend) side of bench_mnist_speed.py: the seed_hybrid model, 1 epoch.

Runs in benchmarks/.venv-keras (benchmarks/setup_keras.sh). Usage: keras_seed.py DATA.npz EPOCHS SEED
Prints one JSON line: train seconds, test accuracy, versions.
"""

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402


def seed_hybrid() -> keras.Model:
    inp = keras.Input((28, 28, 1))
    x = layers.Conv2D(32, 3, activation="relu")(inp)  # (26, 26, 32)
    x = layers.MaxPooling2D(2)(x)  # (13, 13, 32)
    x = layers.Reshape((13, 13 * 32))(x)  # one step per image row
    x = layers.Dense(64, activation="relu")(x)
    x = layers.LSTM(50, return_sequences=True)(x)
    att = layers.MultiHeadAttention(num_heads=2, key_dim=25)(x, x)  # post-norm encoder layer
    x = layers.LayerNormalization(epsilon=1e-5)(x + att)
    ff = layers.Dense(50)(layers.Dense(100, activation="relu")(x))
    x = layers.LayerNormalization(epsilon=1e-5)(x + ff)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, layers.Dense(10)(x))


def main() -> None:
    data = np.load(sys.argv[1])
    epochs = int(sys.argv[2])
    threads = int(os.environ.get("KILN_BENCH_THREADS", "0"))
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(int(sys.argv[3]))
    model = seed_hybrid()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x = data["train_x"][..., None].astype("float32") / 255.0
    t0 = time.perf_counter()
    model.fit(x, data["train_y"], batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    seconds = time.perf_counter() - t0
    _, acc = model.evaluate(data["test_x"][..., None].astype("float32") / 255.0, data["test_y"], batch_size=1000,
                            verbose=0)
    print(json.dumps({"train_seconds": seconds, "test_accuracy": float(acc), "parameters": model.count_params(),
                      "versions": {"keras": keras.__version__, "tensorflow": tf.__version__}}))


if __name__ == "__main__":
    main()
