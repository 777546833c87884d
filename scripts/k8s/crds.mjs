// Validates custom resources against their CRD schemas, for scripts/k8s/validate.py: Istio's
// (`*.istio.io`) and the Prometheus Operator's (`monitoring.coreos.com`).
//
// Input (stdin): a JSON list of {"source": "where it came from", "object": {...}}.
// Output: one line per problem, "source: Kind/name: path: message"; exit status 1 if any.
//
// Each object's API group chooses its npm package (PACKAGES below), and two checks run per object,
// both from that package:
//   1. the package's schema validation (types, enums, required fields, patterns), as the API
//      server validates a custom resource;
//   2. unknown fields, which that validation lets through (CRD schemas prune them on the server,
//      and `kubectl apply` rejects them with its default strict field validation). The allowed
//      fields are read from the package's TypeScript declarations, which list every field of
//      the schema; a declaration this script cannot follow is reported, never passed unchecked.
//
// Usage: node crds.mjs NODE_MODULES_DIR < objects.json

import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const nodeModules = path.resolve(process.argv[2] ?? "node_modules");
const ts = (await import(pathToFileURL(path.join(nodeModules, "typescript", "lib", "typescript.js")))).default;

// The API groups each package describes (pinned in package.json beside this file):
// @kubernetes-models/istio is generated from Istio's CRDs, @kubernetes-models/prometheus-operator
// from the Operator's Go API types, which its CRDs are generated from. Both lay their models out
// as GROUP/VERSION/KIND.js, with KIND.d.ts declaring the interface IKIND.
const PACKAGES = [
  { name: "Istio", pkg: "@kubernetes-models/istio", group: (g) => g.endsWith(".istio.io") },
  {
    name: "Prometheus Operator",
    pkg: "@kubernetes-models/prometheus-operator",
    group: (g) => g === "monitoring.coreos.com",
  },
];

function packageFor(apiVersion) {
  const group = String(apiVersion).split("/")[0];
  return PACKAGES.find((p) => p.group(group)) ?? null;
}

function modelFiles(apiVersion, kind) {
  const [group, version] = String(apiVersion).split("/");
  const pkg = packageFor(apiVersion);
  if (!pkg || !version || !/^[A-Za-z]+$/.test(String(kind))) return null;
  const base = path.join(nodeModules, pkg.pkg, group, version, kind);
  return fs.existsSync(`${base}.js`) ? { js: `${base}.js`, dts: `${base}.d.ts` } : null;
}

// --- the shape of a type, from the .d.ts -----------------------------------------------------

const sourceFiles = new Map();
function sourceFile(file) {
  if (!sourceFiles.has(file)) {
    const text = fs.readFileSync(file, "utf8");
    sourceFiles.set(file, ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true));
  }
  return sourceFiles.get(file);
}

// The .d.ts file a module specifier of `file` names.
function moduleFile(spec, file) {
  const target = spec.startsWith(".") ? path.resolve(path.dirname(file), spec) : path.join(nodeModules, spec);
  const dts = target.replace(/\.js$/, "") + ".d.ts";
  return fs.existsSync(dts) ? dts : null;
}

// Finds the declaration of a type name used in `file`: local, exported under another name
// (`export type { IPodMonitorSpec as IComGithub...PodMonitorSpec }`, as the Prometheus Operator's
// package does), or imported from another package file.
function resolveName(name, file) {
  const sf = sourceFile(file);
  for (const st of sf.statements) {
    if ((ts.isInterfaceDeclaration(st) || ts.isTypeAliasDeclaration(st)) && st.name.text === name) {
      return { decl: st, file };
    }
  }
  for (const st of sf.statements) {
    if (!ts.isExportDeclaration(st) || !st.exportClause || !ts.isNamedExports(st.exportClause)) continue;
    for (const el of st.exportClause.elements) {
      if (el.name.text !== name || !el.propertyName) continue;
      const local = el.propertyName.text;
      if (!st.moduleSpecifier) return local === name ? null : resolveName(local, file);
      const dts = moduleFile(st.moduleSpecifier.text, file);
      return dts ? resolveName(local, dts) : null;
    }
  }
  for (const st of sf.statements) {
    if (!ts.isImportDeclaration(st) || !st.importClause?.namedBindings) continue;
    const bindings = st.importClause.namedBindings;
    if (!ts.isNamedImports(bindings)) continue;
    for (const el of bindings.elements) {
      if (el.name.text !== name) continue;
      const dts = moduleFile(st.moduleSpecifier.text, file);
      return dts ? resolveName((el.propertyName ?? el.name).text, dts) : null;
    }
  }
  return null;
}

const propName = (n) => (ts.isStringLiteral(n) || ts.isIdentifier(n) ? n.text : n.getText());

// A type as the walker needs it: {kind: "object", props, index} | {kind: "array", item} |
// {kind: "union", members} | {kind: "leaf"} | {kind: "unresolved", name} (a reference this
// walker cannot follow: an object there is reported, not passed unchecked).
function shape(node, file) {
  if (!node) return { kind: "leaf" };
  if (ts.isParenthesizedTypeNode(node)) return shape(node.type, file);
  if (ts.isTypeLiteralNode(node)) return membersShape(node.members, file);
  if (ts.isArrayTypeNode(node)) return { kind: "array", item: () => shape(node.elementType, file) };
  if (ts.isUnionTypeNode(node)) return { kind: "union", members: node.types.map((t) => () => shape(t, file)) };
  if (ts.isIntersectionTypeNode(node)) {
    const parts = node.types.map((t) => shape(t, file)).filter((s) => s.kind === "object");
    const props = new Map();
    for (const p of parts) for (const [k, v] of p.props) props.set(k, v);
    return { kind: "object", props, index: parts.find((p) => p.index)?.index ?? null };
  }
  if (ts.isTypeReferenceNode(node)) {
    const name = node.typeName.getText();
    if (name === "Array" && node.typeArguments?.length === 1) {
      return { kind: "array", item: () => shape(node.typeArguments[0], file) };
    }
    const found = resolveName(name, file);
    if (!found) return { kind: "unresolved", name };
    if (ts.isTypeAliasDeclaration(found.decl)) return shape(found.decl.type, found.file);
    return membersShape(found.decl.members, found.file);
  }
  return { kind: "leaf" };
}

function membersShape(members, file) {
  const props = new Map();
  let index = null;
  for (const m of members) {
    if (ts.isPropertySignature(m)) props.set(propName(m.name), () => shape(m.type, file));
    else if (ts.isIndexSignatureDeclaration(m)) index = () => shape(m.type, file);
  }
  return { kind: "object", props, index };
}

// Every field of `value` that `s` does not declare, as "path: unknown field".
function unknownFields(value, s, where) {
  if (value === null || value === undefined) return [];
  if (s.kind === "unresolved") {
    return typeof value === "object"
      ? [`${where || "(top)"}: cannot check its fields: no declaration of ${s.name} found in the package`]
      : [];
  }
  if (s.kind === "union") {
    let best = null;
    for (const member of s.members) {
      const ms = member();
      if (ms.kind === "leaf" && (typeof value !== "object")) return [];
      if (ms.kind === "object" && (typeof value !== "object" || Array.isArray(value))) continue;
      if (ms.kind === "array" && !Array.isArray(value)) continue;
      const problems = unknownFields(value, ms, where);
      if (problems.length === 0) return [];
      if (best === null || problems.length < best.length) best = problems;
    }
    return best ?? [];
  }
  if (s.kind === "array" && Array.isArray(value)) {
    return value.flatMap((v, i) => unknownFields(v, s.item(), `${where}[${i}]`));
  }
  if (s.kind === "object" && typeof value === "object" && !Array.isArray(value)) {
    return Object.entries(value).flatMap(([k, v]) => {
      const field = s.props.get(k) ?? s.index;
      const at = where ? `${where}.${k}` : k;
      return field ? unknownFields(v, field(), at) : [`${at}: unknown field`];
    });
  }
  return [];
}

// --- main --------------------------------------------------------------------------------------

const input = JSON.parse(fs.readFileSync(0, "utf8"));
const problems = [];
for (const { source, object } of input) {
  const id = `${source}: ${object?.kind}/${object?.metadata?.name ?? "?"}`;
  const files = modelFiles(object?.apiVersion, object?.kind);
  if (!files) {
    const pkg = packageFor(object?.apiVersion);
    const what = pkg ? `${pkg.name} schema (${pkg.pkg})` : "CRD schema (groups known: *.istio.io, monitoring.coreos.com)";
    problems.push(`${id}: no ${what} for apiVersion ${object?.apiVersion} kind ${object?.kind}`);
    continue;
  }
  const module = await import(pathToFileURL(files.js));
  const Model = module[object.kind];
  try {
    new Model(object).validate();
  } catch (e) {
    problems.push(`${id}: ${String(e.message ?? e).replace(/(^|, )data\//g, "$1").replace(/\n/g, "; ")}`);
  }
  const iface = resolveName(`I${object.kind}`, files.dts);
  if (!iface) {
    problems.push(`${id}: no declaration I${object.kind} in ${files.dts}`);
    continue;
  }
  const top = membersShape(iface.decl.members, iface.file);
  for (const p of unknownFields(object, top, "")) problems.push(`${id}: ${p}`);
}
for (const p of problems) console.log(p);
process.exit(problems.length ? 1 : 0);
