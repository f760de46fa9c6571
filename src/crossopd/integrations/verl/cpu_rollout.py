"""A rollout for verl that runs on the CPU (``actor_rollout_ref.rollout.name=hf``): Hugging Face
``generate`` behind verl's token-in-token-out server interface, for the student's rollouts and
for a teacher pool's prompt log-probs.

verl 0.9.1 builds a rollout from two registrations of the same name: the replica that launches
the servers (``RolloutReplicaRegistry``, public) and the adapter each training worker uses to push
weights into its server (``verl.workers.rollout.base._ROLLOUT_REGISTRY``, a table with no
register function in this version: ``register`` adds one entry to it). The parts:

- ``HFServer``: one Ray actor per replica holding the model on the CPU. ``generate`` samples
  ``softmax(logits / T)`` (top-p when ``top_p < 1``; nothing else, as crossopd's own rollouts)
  and returns each token's log-prob under that policy; requests that arrive while a batch runs
  are sampled together in the next one. With ``prompt_logprobs`` it scores the
  prompt instead, in vLLM's layout (row ``p`` is token ``p + 1``, the last row is padding), which
  is what verl's teacher pool asks its replicas for.
- ``HFReplica``: verl's ``RolloutReplica`` that launches one ``HFServer``.
- ``HFServerAdapter``: verl's ``BaseRollout`` inside the trainer process: after each update it
  sends the trained weights to its replica's server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput

ROLLOUT_NAME = "hf"


def model_path(model_config: Any) -> str:
    """The local model directory of a verl model config (``HFModelConfig`` or its DictConfig)."""
    return str(getattr(model_config, "local_path", None) or model_config.path)


def server_name(replica_rank: int, teacher: bool, suffix: str) -> str:
    role = "teacher_" if teacher else ""
    return f"{ROLLOUT_NAME}_server_{role}{replica_rank}{suffix}"


class HFServer:
    """verl's rollout-server calls on a CPU model (see the module docstring)."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int) -> None:
        from crossopd.models.hub import load_hf_model, load_hf_tokenizer

        self.config, self.replica_rank = config, replica_rank
        path = model_path(model_config)
        self.model = load_hf_model(path, device="cpu").eval()
        tokenizer = load_hf_tokenizer(path)
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_ids = set(eos) | ({tokenizer.eos_token_id} - {None})
        if getattr(tokenizer, "chat_template", None):
            # a chat model's turn ends at its template's end-of-turn, as crossopd's own
            # rollouts end it (a checkpoint's generation config may name only the document's
            # end, and a turn would run on to the length limit)
            from crossopd.step.bridge import ChatFormat

            self.stop_ids |= set(ChatFormat.from_tokenizer(tokenizer).stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            min(self.stop_ids)
        self.global_steps: int | None = None
        self.lock = asyncio.Lock()
        self.waiting: list[tuple[list[int], dict, asyncio.Future]] = []

    async def ready(self) -> bool:
        return True

    def _max_tokens(self, prompt_ids: list[int], params: dict) -> int:
        limit = self.config.prompt_length + self.config.response_length - len(prompt_ids)
        want = params.get("max_tokens") or params.get("max_new_tokens")
        return max(1, min(want or self.config.response_length, limit))

    @staticmethod
    def _policy(params: dict) -> tuple[float, float]:
        """(temperature, top_p) of a request; greedy (verl's validation) is T = 1 with a nucleus
        of one token."""
        for key, neutral in (("top_k", (-1, 0, None)), ("repetition_penalty", (1.0, None))):
            if params.get(key) not in neutral:
                raise ValueError(f"the hf rollout samples softmax(logits / T) with top-p only: "
                                 f"{key}={params[key]} is not supported")
        temperature = float(params.get("temperature", 1.0))
        if temperature <= 0:
            return 1.0, 1e-9
        return temperature, float(params.get("top_p", 1.0))

    def _sample(self, batch: list[tuple[list[int], dict]]) -> list[tuple[list[int], Any]]:
        """One ``generate`` call for requests of the same policy and length limit; each
        response's log-probs under that policy when its request asked for them."""
        from crossopd.models.sampling import sample
        from crossopd.models.scoring import score_sequences

        prompts = [p for p, _ in batch]
        temperature, top_p = self._policy(batch[0][1])
        responses = [r.tolist() for r in sample(
            self.model, prompts, max_new_tokens=self._max_tokens(prompts[0], batch[0][1]),
            temperature=temperature, top_p=top_p, stop_ids=self.stop_ids, pad_id=self.pad_id)]
        with torch.inference_mode():
            logps = score_sequences(self.model, [p + r for p, r in zip(prompts, responses)],
                                    [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses)],
                                    temperature=temperature)
        return [(r, lp.tolist() if params.get("logprobs") else None)
                for r, lp, (_, params) in zip(responses, logps, batch)]

    def _prompt_logprobs(self, prompt_ids: list[int]) -> dict[str, list]:
        from crossopd.models.scoring import score_sequences

        with torch.inference_mode():
            (lp,) = score_sequences(self.model, [prompt_ids], [(1, len(prompt_ids))])
        return {"prompt_ids": [[t] for t in prompt_ids[1:]] + [[0]],
                "prompt_logprobs": [[v] for v in lp.tolist()] + [[0.0]]}

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any],
                       request_id: str, **kwargs: Any) -> TokenOutput:
        if kwargs.get("image_data") or kwargs.get("video_data") or kwargs.get("audio_data"):
            raise ValueError("the hf rollout is text-only")
        params, prompt_ids = dict(sampling_params), [int(t) for t in prompt_ids]
        extra: dict[str, Any] = {"global_steps": self.global_steps}
        if params.get("prompt_logprobs") is not None:  # a teacher pool's request: score it
            async with self.lock:  # one forward at a time: the CPU's threads are shared
                extra.update(await asyncio.to_thread(self._prompt_logprobs, prompt_ids))
            return TokenOutput(token_ids=[], stop_reason="completed", extra_fields=extra)
        self._policy(params)  # an unsupported setting fails this request alone
        # requests that arrive while a batch runs wait for the lock and go in the next one
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((prompt_ids, params, done))
        async with self.lock:
            if not done.done():
                await self._run_waiting()
        ids, logps = await done
        return TokenOutput(token_ids=ids, log_probs=logps, stop_reason="completed",
                           extra_fields=extra)

    async def _run_waiting(self) -> None:
        """Every waiting request, in one ``generate`` per policy and length limit."""
        waiting, self.waiting = self.waiting, []
        groups: dict[tuple, list] = {}
        for prompt, params, done in waiting:
            key = (self._policy(params), self._max_tokens(prompt, params))
            groups.setdefault(key, []).append((prompt, params, done))
        for group in groups.values():
            try:
                results = await asyncio.to_thread(self._sample, [(p, q) for p, q, _ in group])
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for _, _, done in group:
                    done.set_exception(e)
                continue
            for (_, _, done), result in zip(group, results):
                done.set_result(result)

    async def load_weights(self, weights: dict[str, torch.Tensor],
                           global_steps: int | None) -> None:
        """The trained weights (HF names, full tensors) replace the server's."""
        result = self.model.load_state_dict(weights, strict=False)
        tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise ValueError(f"weights do not fit the rollout model: missing "
                             f"{sorted(set(result.missing_keys) - tied)[:5]}, unexpected "
                             f"{sorted(result.unexpected_keys)[:5]}")
        if global_steps is not None:
            self.global_steps = global_steps

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # memory management and request control: nothing to free or pause on the CPU
    async def wake_up(self, tags: Iterable[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    release_kv_cache = resume_kv_cache = resume_generation = clear_kv_cache

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        return {"aborted_count": 0, "request_ids": []}

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


class HFReplica(RolloutReplica):
    """verl's rollout replica for ``rollout.name=hf``: one ``HFServer`` per replica."""

    def rollout_worker_use_gpu(self) -> bool:
        return True

    async def launch_servers(self) -> None:
        name = server_name(self.replica_rank, self.is_teacher_model, self.name_suffix)
        node = None
        if self.workers:
            node = await self.workers[0].__ray_call__.remote(
                lambda w: ray.get_runtime_context().get_node_id())
        options: dict[str, Any] = {"name": name, "max_concurrency": self.max_concurrency,
                                   "num_cpus": 0}
        if node is not None:
            options["scheduling_strategy"] = \
                ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node,
                                                                              soft=False)
        server = ray.remote(HFServer).options(**options).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        await server.ready.remote()
        self.servers = [server]
        self._server_handle, self._server_address = server, name


class HFServerAdapter(BaseRollout):
    """The training worker's side of ``rollout.name=hf``: sends updated weights to its server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1,
                 **kwargs: Any) -> None:
        import os

        super().__init__(config, model_config, device_mesh)
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.is_leader_rank = rank % world == 0
        self.server: Any = None

    def _server(self) -> Any:
        if self.server is None:
            self.server = ray.get_actor(server_name(self.replica_rank, False, ""))
        return self.server

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    @torch.no_grad()
    async def update_weights(self, weights: Any, global_steps: int | None = None,
                             wire_format: str = "named_tensors", **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"the hf rollout takes full named tensors, not {wire_format!r}")
        state = {}
        for name, tensor in weights:  # every rank walks the generator (it may gather)
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state[name] = tensor.detach().to("cpu", copy=True)
        if self.is_leader_rank:
            await self._server().load_weights.remote(state, global_steps)


def register() -> None:
    """``rollout.name=hf`` (and ``inference.name=hf`` for a teacher pool)."""
    from verl.workers.rollout import base

    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFReplica)
    base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.HFServerAdapter"
