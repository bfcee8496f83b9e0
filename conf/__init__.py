# Makes conf/ a package, installed as hybridlm.conf (pyproject.toml), so that the Hydra configs ship in the wheel
# and `python -m hybridlm.train` finds them through the package (config_path="pkg://hybridlm.conf"), outside a
# checkout too. The YAML files are the package's data; nothing here is imported.
