// Parses PromQL expressions with Prometheus' own grammar, for scripts/k8s/validate.py.
//
// Input (stdin): a JSON list of {"where": "what it is", "expr": "..."}.
// Output: one line per expression that does not parse, "where: PromQL syntax error at line L,
// column C: <the text there>"; exit status 1 if any.
//
// The grammar is npm @prometheus-io/lezer-promql, the parser of Prometheus' own web UI: it knows
// PromQL's functions and operators, so a misspelt function, a missing parenthesis or a dangling
// `by` is an error node in the tree. It checks syntax only; whether a metric exists is checked by
// tests/docs_examples.rs against what subguard exports.
//
// Usage: node promql.mjs NODE_MODULES_DIR < expressions.json

import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const nodeModules = path.resolve(process.argv[2] ?? "node_modules");
const { parser } = await import(
  pathToFileURL(path.join(nodeModules, "@prometheus-io", "lezer-promql", "dist", "index.es.js"))
);

const items = JSON.parse(fs.readFileSync(0, "utf8"));
let failed = 0;
for (const { where, expr } of items) {
  let at = null;
  parser.parse(expr).iterate({
    enter: (node) => {
      if (at === null && node.type.isError) at = node.from;
      return at === null;
    },
  });
  if (at === null) continue;
  failed += 1;
  const before = expr.slice(0, at).split("\n");
  const line = before.length;
  const column = before[before.length - 1].length + 1;
  const there = expr.slice(at).split("\n")[0].slice(0, 40) || "(the end)";
  console.log(`${where}: PromQL syntax error at line ${line}, column ${column}: ${JSON.stringify(there)}`);
}
process.exit(failed ? 1 : 0);
