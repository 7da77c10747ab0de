"""Signing a snapshot's manifest with OpenSSH: ``ssh-keygen -Y sign`` / ``-Y verify``.

A tool users already have and keys they already manage: an SSH key signs, an
``allowed_signers`` file (the format ``git`` uses for SSH-signed commits, see
``ssh-keygen(1)`` ALLOWED SIGNERS) says whose keys are trusted, under which principal.
Every signature is made in the namespace :data:`NAMESPACE`, so a signature made for
anything else (a git commit, a file) never verifies as a snapshot's.

The command builders are pure; :func:`run` is the one place that starts ``ssh-keygen``
(a list argv through :func:`subprocess.run`, never a shell).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from .errors import InputError

NAMESPACE = "harness-snapshot"
SSH_KEYGEN = "ssh-keygen"
INSTALL_HINT = "install OpenSSH's client (Debian/Ubuntu: apt-get install openssh-client)"


# ----------------------------------------------------------------------------- pure command builders


def sign_command(key: str | Path) -> list[str]:
    """Sign standard input with ``key``; the armored signature goes to standard output."""
    return [SSH_KEYGEN, "-Y", "sign", "-f", str(key), "-n", NAMESPACE]


def find_principals_command(allowed_signers: str | Path, signature: str | Path) -> list[str]:
    """The principals of ``allowed_signers`` whose key made ``signature`` (does not check the message)."""
    return [SSH_KEYGEN, "-Y", "find-principals", "-f", str(allowed_signers), "-s", str(signature)]


def verify_command(allowed_signers: str | Path, identity: str, signature: str | Path) -> list[str]:
    """Check that ``signature`` over standard input was made by ``identity``'s key in ``allowed_signers``."""
    return [SSH_KEYGEN, "-Y", "verify", "-f", str(allowed_signers), "-I", identity, "-n", NAMESPACE,
            "-s", str(signature)]


# ----------------------------------------------------------------------------- running them


def run(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run one ssh-keygen command; a missing ssh-keygen is one line."""
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=120, check=False)
    except FileNotFoundError:
        raise InputError(argv[0], "not found (snapshot signatures are made and checked with OpenSSH's ssh-keygen)",
                         hint=INSTALL_HINT) from None
    except subprocess.TimeoutExpired:
        raise InputError(argv[0], f"did not answer within 120s ({' '.join(argv[1:4])})") from None


def require_tool() -> None:
    """Refuse early, with one line, when ssh-keygen is not installed."""
    import shutil

    if shutil.which(SSH_KEYGEN) is None:
        raise InputError(SSH_KEYGEN, "not found (snapshot signatures are made and checked with OpenSSH's ssh-keygen)",
                         hint=INSTALL_HINT)


def _last_line(p: subprocess.CompletedProcess[bytes]) -> str:
    text = (p.stderr or b"").decode(errors="replace") + (p.stdout or b"").decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Signing data on standard input")]
    return lines[-1][:300] if lines else f"exit status {p.returncode}"


def sign(message: bytes, key: str | Path) -> bytes:
    """The armored SSH signature of ``message`` made with ``key`` (a private key, or a public
    key whose private half is in ssh-agent)."""
    if not Path(key).is_file():
        raise InputError(str(key), "not found", hint="pass an SSH private key, e.g. ~/.ssh/id_ed25519")
    p = run(sign_command(key), message)
    if p.returncode != 0 or not p.stdout.startswith(b"-----BEGIN SSH SIGNATURE-----"):
        raise InputError(str(key), f"ssh-keygen could not sign with it: {_last_line(p)}")
    return p.stdout


def verify(message: bytes, signature: bytes, allowed_signers: str | Path, identity: str | None,
           where: str, member: str) -> tuple[str, str]:
    """Check ``signature`` over ``message``; returns ``(principal, ssh-keygen's line)``.

    Without ``identity`` the principal is the one ``allowed_signers`` lists for the key that
    made the signature (``ssh-keygen -Y find-principals``): any key the file trusts is
    accepted, and the output names whose it was. Every failure is an InputError naming
    ``member``.
    """
    allowed = Path(allowed_signers)
    if not allowed.is_file():
        raise InputError(str(allowed), "not found", hint="pass an allowed_signers file (see ssh-keygen(1), ALLOWED SIGNERS)")
    with tempfile.TemporaryDirectory(prefix="harness-sig-") as tmp:
        sig = Path(tmp) / "manifest.sig"
        sig.write_bytes(signature)
        if identity is None:
            p = run(find_principals_command(allowed, sig))
            principals = [ln.strip() for ln in p.stdout.decode(errors="replace").splitlines() if ln.strip()]
            if p.returncode != 0 or not principals:
                raise InputError(where, f"{member}: no principal in {allowed} holds the key that made it "
                                        f"({key_fingerprint(signature)}): {_last_line(p)}",
                                 hint="the snapshot was signed by a key you do not trust, or the signature is damaged")
            identity = principals[0]
        p = run(verify_command(allowed, identity, sig), message)
        if p.returncode != 0:
            raise InputError(where, f"{member} does not verify for {identity} against {allowed}: {_last_line(p)}",
                             hint="the snapshot was altered after it was signed, or signed by another key")
    good = next((ln.strip() for ln in p.stdout.decode(errors="replace").splitlines() if ln.startswith("Good")), "")
    return identity, good


def key_fingerprint(signature: bytes) -> str:
    """``SHA256:...`` of the public key inside an armored SSH signature (``PROTOCOL.sshsig``),
    as ``ssh-keygen -l`` prints it; ``key unknown`` when the signature cannot be parsed."""
    import base64
    import hashlib
    import struct

    try:
        body = b"".join(ln.strip() for ln in signature.splitlines() if ln.strip() and not ln.startswith(b"-----"))
        blob = base64.b64decode(body, validate=True)
        if blob[:6] != b"SSHSIG":
            return "key unknown"
        (n,) = struct.unpack(">I", blob[10:14])
        key = blob[14:14 + n]
        if len(key) != n or n == 0:
            return "key unknown"
    except (ValueError, struct.error):
        return "key unknown"
    return "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")


