// Keys, a JWKS and tokens made by panva/jose on Node's WebCrypto, for tests/interop.rs: the same
// cases and output as pyjwt_mint.py, from another implementation.
//
//   node jose_mint.mjs NODE_MODULES ISSUER AUD SUB
//
// NODE_MODULES is where `make interop-tools` installed the pinned jose (tests/interop/package.json).
// Prints {"jwks": {...}, "tokens": [{"case", "token", "expect"}, ...]}. Every algorithm gets a fresh
// key, exported by `exportJWK` with a `kid`; the RS* and ES* keys also get `use` and `alg`, the PS*
// and EdDSA keys stay as jose made them. Cases per algorithm: with a kid, without one, claims
// altered under the original signature, signed by a key the JWKS lacks (same kid); then four
// claim shapes and one header shape, signed RS256.

import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [nodeModules, issuer, audience, sub] = process.argv.slice(2);
const manifest = JSON.parse(fs.readFileSync(path.join(nodeModules, "jose", "package.json"), "utf8"));
const entry = path.join(nodeModules, "jose", manifest.exports["."].default);
const jose = await import(pathToFileURL(entry));

const ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

const b64url = (text) => Buffer.from(text).toString("base64url");
const sign = (claims, key, header) => new jose.SignJWT(claims).setProtectedHeader(header).sign(key);

const now = Math.floor(Date.now() / 1000);
const claims = { iss: issuer, aud: [audience, "other"], sub, iat: now, nbf: now, exp: now + 600 };
const keys = [];
const tokens = [];
const privates = {};

for (const alg of ALGORITHMS) {
  const kid = `jose-${alg.toLowerCase()}`;
  const { publicKey, privateKey } = await jose.generateKeyPair(alg, { extractable: true });
  const jwk = { ...(await jose.exportJWK(publicKey)), kid };
  if (alg.startsWith("RS") || alg.startsWith("ES")) {
    Object.assign(jwk, { use: "sig", alg });
  }
  keys.push(jwk);
  privates[alg] = privateKey;

  const signed = await sign(claims, privateKey, { alg, kid });
  tokens.push({ case: `${alg} with kid`, token: signed, expect: "ok" });
  tokens.push({ case: `${alg} without kid`, token: await sign(claims, privateKey, { alg }), expect: "ok" });
  const [header, , signature] = signed.split(".");
  const altered = b64url(JSON.stringify({ ...claims, sub: "someone-else" }));
  tokens.push({ case: `${alg} claims altered`, token: `${header}.${altered}.${signature}`, expect: "invalid_signature" });
  const stranger = (await jose.generateKeyPair(alg)).privateKey;
  tokens.push({ case: `${alg} signed by another key`, token: await sign(claims, stranger, { alg, kid }), expect: "invalid_signature" });
}

// NumericDates with fractions (RFC 7519 §2) either side of the default 60 s leeway, and `aud` as one string.
const t = Date.now() / 1000;
const shapes = [
  ["fractional exp, iat and nbf", { exp: t + 600.5, iat: t - 0.25, nbf: t - 1.5 }, "ok"],
  ["aud as one string", { aud: audience }, "ok"],
  ["fractional exp 61.5 s ago", { exp: t - 61.5, iat: t - 700.25 }, "token_expired"],
  ["fractional nbf in 600.5 s", { nbf: t + 600.5 }, "token_not_yet_valid"],
];
for (const [name, changes, expect] of shapes) {
  const token = await sign({ ...claims, ...changes }, privates.RS256, { alg: "RS256", kid: "jose-rs256" });
  tokens.push({ case: `RS256 ${name}`, token, expect });
}
// An RFC 9068 access token's `typ`, and a `jku` on the issuer's host that must never be fetched.
const header = { alg: "RS256", kid: "jose-rs256", typ: "at+jwt", jku: `${issuer}/jku-never-fetched` };
tokens.push({ case: "RS256 typ at+jwt with a jku", token: await sign(claims, privates.RS256, header), expect: "ok" });

process.stdout.write(JSON.stringify({ jwks: { keys }, tokens }));
