# The image every node of a metarl cluster runs (cluster/ray-cluster.yaml, cluster/kuberay/*.yaml):
#
#   docker build -t registry.example.com/metarl:ray2.60.0-py311-gpu .
#   docker push registry.example.com/metarl:ray2.60.0-py311-gpu
#
# Base: Ray's official GPU image for Python 3.11, with the Ray version pinned in pyproject.toml
# (tests/test_cluster_configs.py checks that the two, and the cluster YAMLs, agree). The same
# image serves the CPU worker nodes: CUDA is simply unused there.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/metarl

# Dependencies in their own layer, rebuilt only when pyproject.toml changes. Ray is already in the
# base image at the pinned version, so pip adds only what the [default,rllib] extras still miss;
# torch from PyPI is its CUDA build. boto3 lets the head's autoscaler launch AWS nodes.
COPY --chown=ray:users pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "boto3>=1.26" \
    && rm /tmp/requirements.txt

# The package (not editable) and the configs that `metarl run --config` reads. Code submitted with
# `ray job submit --working-dir .` is unpacked on the cluster and put first on PYTHONPATH, so a
# job runs the submitted metarl even when this installed copy is older.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users metarl ./metarl
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import ray, metarl, ale_py, torch; assert ray.__version__ == '2.60.0', ray.__version__" \
    && metarl run --help > /dev/null
