"""Keys, a JWKS and tokens made by PyJWT and `cryptography` (not by the Rust code that verifies).

Run by tests/interop.rs with the project's .venv python. Prints one JSON object:
  {"jwks": {...}, "tokens": [{"case": "...", "token": "...", "expect": "<reason or ok>"}, ...]}

Every algorithm subguard verifies gets its own fresh key, published the way PyJWT exports it
(`to_jwk`) with a `kid`; the RS* and ES* keys also get `use` and `alg`, as most IdPs publish
them, the PS* and EdDSA keys stay as PyJWT made them. Cases per algorithm: a valid token
with a kid, the same without a kid, its claims altered under the original signature, and signed
by a key of the same type that the JWKS does not have (same kid); then four claim shapes and
one header shape, signed RS256 (below).

Usage: pyjwt_mint.py ISSUER AUD SUB
"""

import base64
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


ALGORITHMS = {
    "RS256": (rsa_key, RSAAlgorithm),
    "RS384": (rsa_key, RSAAlgorithm),
    "RS512": (rsa_key, RSAAlgorithm),
    "PS256": (rsa_key, RSAAlgorithm),
    "PS384": (rsa_key, RSAAlgorithm),
    "PS512": (rsa_key, RSAAlgorithm),
    "ES256": (lambda: ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
    "ES384": (lambda: ec.generate_private_key(ec.SECP384R1()), ECAlgorithm),
    "EdDSA": (ed25519.Ed25519PrivateKey.generate, OKPAlgorithm),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> None:
    issuer, audience, sub = sys.argv[1:4]
    now = int(time.time())
    claims = {"iss": issuer, "aud": [audience, "other"], "sub": sub, "iat": now, "nbf": now, "exp": now + 600}
    keys, tokens, privates = [], [], {}
    for alg, (generate, algorithm) in ALGORITHMS.items():
        kid = f"pyjwt-{alg.lower()}"
        private = generate()
        jwk = algorithm.to_jwk(private.public_key(), as_dict=True)
        jwk["kid"] = kid
        if alg.startswith(("RS", "ES")):
            jwk.update({"use": "sig", "alg": alg})
        keys.append(jwk)

        signed = jwt.encode(claims, private, algorithm=alg, headers={"kid": kid})
        tokens.append({"case": f"{alg} with kid", "token": signed, "expect": "ok"})
        kidless = jwt.encode(claims, private, algorithm=alg)
        tokens.append({"case": f"{alg} without kid", "token": kidless, "expect": "ok"})

        header, _, signature = signed.split(".")
        altered = b64url(json.dumps({**claims, "sub": "someone-else"}).encode())
        tokens.append(
            {"case": f"{alg} claims altered", "token": f"{header}.{altered}.{signature}", "expect": "invalid_signature"}
        )
        stranger = jwt.encode(claims, generate(), algorithm=alg, headers={"kid": kid})
        tokens.append({"case": f"{alg} signed by another key", "token": stranger, "expect": "invalid_signature"})
        privates[alg] = private

    # Claim shapes other libraries emit, signed RS256: NumericDates with fractions (RFC 7519 §2
    # allows them) on both sides of the default 60 s leeway, and `aud` as a single string.
    t = time.time()
    shapes = [
        ("fractional exp, iat and nbf", {"exp": t + 600.5, "iat": t - 0.25, "nbf": t - 1.5}, "ok"),
        ("aud as one string", {"aud": audience}, "ok"),
        ("fractional exp 61.5 s ago", {"exp": t - 61.5, "iat": t - 700.25}, "token_expired"),
        ("fractional nbf in 600.5 s", {"nbf": t + 600.5}, "token_not_yet_valid"),
    ]
    for case, changes, expect in shapes:
        token = jwt.encode({**claims, **changes}, privates["RS256"], algorithm="RS256", headers={"kid": "pyjwt-rs256"})
        tokens.append({"case": f"RS256 {case}", "token": token, "expect": expect})
    # An RFC 9068 access token's `typ`, and a `jku` on the issuer's host that must never be fetched.
    header = {"kid": "pyjwt-rs256", "typ": "at+jwt", "jku": f"{issuer}/jku-never-fetched"}
    token = jwt.encode(claims, privates["RS256"], algorithm="RS256", headers=header)
    tokens.append({"case": "RS256 typ at+jwt with a jku", "token": token, "expect": "ok"})
    print(json.dumps({"jwks": {"keys": keys}, "tokens": tokens}))


if __name__ == "__main__":
    main()
