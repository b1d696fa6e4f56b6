"""A stand-in Hugging Face Hub for the tests: the real huggingface_hub client talks to it over HTTP
on 127.0.0.1, for the routes mergecli uses (downloads, header reads, push).

Use the `fake_hub` fixture (import it as ``from fakehub import fake_hub as fake_hub  # noqa: F401``):
a started `FakeHub` with one write token (`hub.token`, user "fake-user"), wired in with
`use_fake_hub`; no token is configured client-side. For a subprocess, pass
``env=hub.subprocess_env(tmp_path / "home", token=...)``.

huggingface_hub 2.4 behaviours the fake relies on:

- `huggingface_hub.constants` reads the environment once, at import: `use_fake_hub` sets the
  variables (for subprocesses) and patches the imported constants, the cache paths, and the
  endpoint of the module-level `HfApi` (wiring.py).
- With `hf_xet` installed, uploads always go through Xet unless `HF_HUB_DISABLE_XET`; the fake
  speaks git-LFS only, so the wiring disables Xet.
- Errors map by the `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound,
  GatedRepo); a 401 "Invalid credentials in Authorization header" stays a plain HfHubHTTPError.
- Retries (408/429/5xx and network errors, 1+2+4+8+8 s) apply to downloads and LFS calls, not to
  the commit, create_repo, model_info or whoami: `fast_retries` removes the sleeps.
- An interrupted commit surfaces as `httpx2.RemoteProtocolError`; a 500 on commit as HfHubHTTPError.
- A re-run after an interrupted commit is cheap: preupload answers with each stored file's oid, and
  the LFS batch leaves out objects already stored.
- A commit touching README.md first POSTs it to /api/validate-yaml (bad front matter → ValueError).

Auth: tokens map to a user with or without write access. An unknown token gets 401 everywhere;
anonymous requests read public repos; writes need a write token (anonymous 401, read-only 403).
A private repo is 401 RepoNotFound to anonymous callers; a gated repo's files need `grant_access`.
"""

from fakehub.repos import CommitRecord, repo_files
from fakehub.server import DEFAULT_TOKEN, FakeHub, RequestRecord
from fakehub.wiring import fake_hub, fast_retries, point_huggingface_hub, running_hub, use_fake_hub

__all__ = ["DEFAULT_TOKEN", "CommitRecord", "FakeHub", "RequestRecord", "fake_hub", "fast_retries",
           "point_huggingface_hub", "repo_files", "running_hub", "use_fake_hub"]
