# The image every node runs, on a `ray up` cluster (cluster.yaml) and on Kubernetes (k8s/rayjob.yaml):
# the official Ray GPU image at exactly the Ray version pinned in constraints.txt, Python 3.11 as the
# pins are made for, the project and its GPU extra at their pins, and the ImageNet Xception "notop"
# weights baked in, so no trial downloads them.
#
#   docker build -t <REGISTRY>/boneage-tune:2.60.0-py311-gpu .
#   docker push <REGISTRY>/boneage-tune:2.60.0-py311-gpu
#
# The tag repeats the base image's tag (tests/test_cluster_config.py checks both against the installed
# Ray). Rebuild and push after changing constraints.txt; code and configs travel with `ray job submit
# --working-dir .` (README, "Running on AWS"), or come from this image on Kubernetes.
FROM rayproject/ray:2.60.0-py311-gpu

# Keras' download cache, where the weights are put below. Set explicitly: without it Keras falls back
# to /tmp/.keras when the home folder is not writable (Kubernetes may run the image as another user),
# and would download the weights again there.
ENV KERAS_HOME=/home/ray/.keras

# Made by the image's user `ray` (WORKDIR alone would make it root's), as the editable install writes
# its metadata beside the sources.
RUN mkdir -p /home/ray/boneage-tune
WORKDIR /home/ray/boneage-tune
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users boneage boneage
COPY --chown=ray:users tuning tuning
COPY --chown=ray:users configs configs

# The project at its pins with the PostgreSQL driver (a study on a server: README, "The Optuna study in
# PostgreSQL"); boto3 too, at its pin: the autoscaler on the head launches the EC2 workers
# with it, and the base image's older boto3 does not accept the pinned urllib3 and python-dateutil.
RUN pip install --no-cache-dir -c constraints.txt -e ".[gpu,postgres]" boto3 \
 && python -c "import ray, tensorflow, keras, optuna, boto3, pyarrow.fs, psycopg2, boneage, tuning; \
assert ray.__version__ == '2.60.0', ray.__version__; print('ray', ray.__version__, 'tensorflow', tensorflow.__version__)"

# The ImageNet weights of Xception without its top, fetched once here (Keras checks the file's hash).
# configs/cluster.yaml names this file as model.weights; `model.weights: imagenet` finds it too.
RUN python -c "import keras; keras.applications.Xception(weights='imagenet', include_top=False)" \
 && ls -l "$KERAS_HOME/models/xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
