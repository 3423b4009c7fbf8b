"""Tenants: API keys -> who is calling, which adapters they may use, and their limits.

The tenants file (YAML, `--tenants FILE`):

    admin_keys: [sk-admin-1]          # may load/unload adapters and use every model
    tenants:
      acme:
        keys: [sk-acme-1, sk-acme-2]
        adapters: ["acme-*", shared]  # names or shell-style globs
        base: true                    # may use the base model (default true)
        max_concurrent: 8             # requests in flight (optional)
        requests_per_minute: 600      # (optional)
        tokens_per_minute: 200000     # prompt + completion tokens (optional)
        weight: 1                     # share of the engine under contention (default 1)

Invariants: every key belongs to exactly one principal; keys are compared in constant time
against every key (no early exit that would time which one matched) and never logged; a tenant
sees and reaches only its own adapters, and anything else is answered exactly like a model that
does not exist.
"""

from __future__ import annotations

import fnmatch
import hmac
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loraplex.config import ConfigError

_TENANT_KEYS = {"keys", "adapters", "base", "max_concurrent", "requests_per_minute",
                "tokens_per_minute", "weight"}
WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    adapters: tuple[str, ...]  # names or globs
    base: bool = True
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    weight: float = 1.0

    def may_use_adapter(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, p) for p in self.adapters)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: an admin (everything) or one tenant."""

    tenant: Tenant | None
    admin: bool = False

    @property
    def name(self) -> str | None:
        return None if self.tenant is None else self.tenant.name


ADMIN = Principal(None, admin=True)


@dataclass(slots=True)
class _Usage:
    in_flight: int = 0
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (finish time, tokens)


class LimitExceeded(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Tenants:
    def __init__(self, tenants: list[Tenant], keys: dict[bytes, str],
                 admin_keys: list[bytes]) -> None:
        self.by_name = {t.name: t for t in tenants}
        # Flat list of (key, principal) so `identify` touches every entry whatever the match.
        self._keys: list[tuple[bytes, Principal]] = (
            [(k, ADMIN) for k in admin_keys]
            + [(k, Principal(self.by_name[n])) for k, n in keys.items()])
        self._usage: dict[str, _Usage] = {t.name: _Usage() for t in tenants}
        self._lock = threading.Lock()

    # ---- loading ------------------------------------------------------------------------------
    @staticmethod
    def from_file(path: str | Path, extra_admin_key: str | None = None) -> Tenants:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--tenants {p}: cannot read it ({e})") from None
        return Tenants.from_dict(raw, f"--tenants {p}", extra_admin_key)

    @staticmethod
    def from_dict(raw: object, where: str = "tenants",
                  extra_admin_key: str | None = None) -> Tenants:
        if not isinstance(raw, dict) or not set(raw) <= {"admin_keys", "tenants"}:
            raise ConfigError(f"{where}: expected a mapping with `tenants` (and `admin_keys`)")
        admin = [_key(k, where) for k in (raw.get("admin_keys") or [])]
        if extra_admin_key:
            admin.append(extra_admin_key.encode())
        specs = raw.get("tenants") or {}
        if not isinstance(specs, dict) or not specs:
            raise ConfigError(f"{where}: `tenants` must map tenant names to their settings")
        seen: set[bytes] = set(admin)
        if len(seen) != len(admin):
            raise ConfigError(f"{where}: an admin key is listed twice")
        tenants, keys = [], {}
        for name, spec in specs.items():
            at = f"{where}: tenant {name!r}"
            if not isinstance(spec, dict):
                raise ConfigError(f"{at}: expected a mapping")
            unknown = set(spec) - _TENANT_KEYS
            if unknown:
                raise ConfigError(f"{at}: unknown setting(s) {', '.join(sorted(unknown))}")
            ks = spec.get("keys")
            if not isinstance(ks, list) or not ks:
                raise ConfigError(f"{at}: `keys` must be a non-empty list")
            for k in ks:
                kb = _key(k, at)
                if kb in seen:  # the key itself is never echoed
                    raise ConfigError(f"{at}: a key is also used by another tenant or admin")
                seen.add(kb)
                keys[kb] = str(name)
            adapters = spec.get("adapters", [])
            if isinstance(adapters, str):
                adapters = [adapters]
            if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
                raise ConfigError(f"{at}: `adapters` must be a list of names or globs")
            limits = {}
            for lim in ("max_concurrent", "requests_per_minute", "tokens_per_minute"):
                v = spec.get(lim)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                    raise ConfigError(f"{at}: {lim} must be a positive integer, got {v!r}")
                limits[lim] = v
            weight = spec.get("weight", 1)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) \
                    or not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"{at}: weight must be a positive number, got {weight!r}")
            base = spec.get("base", True)
            if not isinstance(base, bool):
                raise ConfigError(f"{at}: base must be true or false")
            tenants.append(Tenant(str(name), tuple(adapters), base, weight=float(weight),
                                  **limits))
        return Tenants(tenants, keys, admin)

    # ---- who ----------------------------------------------------------------------------------
    def identify(self, token: bytes) -> Principal | None:
        found = None
        for key, principal in self._keys:  # no early exit: constant in which key matches
            if hmac.compare_digest(token, key):
                found = principal
        return found

    @staticmethod
    def may_use(principal: Principal | None, model: str, is_base: bool) -> bool:
        if principal is None or principal.admin:
            return True
        t = principal.tenant
        return t.base if is_base else t.may_use_adapter(model)

    # ---- limits -------------------------------------------------------------------------------
    def admit(self, principal: Principal | None, now: float | None = None) -> None:
        """Count a request in, or raise LimitExceeded (-> 429 with Retry-After)."""
        if principal is None or principal.tenant is None:
            return
        t, now = principal.tenant, time.monotonic() if now is None else now
        with self._lock:
            u = self._usage[t.name]
            self._expire(u, now)
            if t.max_concurrent is not None and u.in_flight >= t.max_concurrent:
                raise LimitExceeded(f"Tenant concurrency limit reached ({t.max_concurrent} "
                                    "requests in flight).", 1)
            if t.requests_per_minute is not None and len(u.requests) >= t.requests_per_minute:
                raise LimitExceeded(
                    f"Tenant request rate limit reached ({t.requests_per_minute} per minute).",
                    _retry(u.requests[0], now))
            if t.tokens_per_minute is not None:
                used = sum(n for _, n in u.tokens)
                if used >= t.tokens_per_minute:
                    raise LimitExceeded(
                        f"Tenant token rate limit reached ({t.tokens_per_minute} per minute).",
                        _retry(u.tokens[0][0], now))
            u.in_flight += 1
            u.requests.append(now)

    def release(self, principal: Principal | None, tokens: int, now: float | None = None
                ) -> None:
        """A request admitted by `admit` ended, having used `tokens` (prompt + completion)."""
        if principal is None or principal.tenant is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            u = self._usage[principal.tenant.name]
            u.in_flight = max(0, u.in_flight - 1)
            if tokens > 0:
                u.tokens.append((now, tokens))

    def in_flight(self, name: str) -> int:
        return self._usage[name].in_flight

    @staticmethod
    def _expire(u: _Usage, now: float) -> None:
        while u.requests and u.requests[0] <= now - WINDOW_S:
            u.requests.popleft()
        while u.tokens and u.tokens[0][0] <= now - WINDOW_S:
            u.tokens.popleft()


def _key(k: object, where: str) -> bytes:
    if not isinstance(k, str) or len(k) < 8 or k.strip() != k:
        raise ConfigError(f"{where}: every key must be a string of at least 8 characters "
                          "without surrounding spaces")
    return k.encode()


def _retry(oldest: float, now: float) -> int:
    return max(1, math.ceil(oldest + WINDOW_S - now))
