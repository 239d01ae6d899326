// node-postgres against the proxy's query cache: the same query twice (a miss, then a hit),
// in text and in binary result format, with every value kept raw (no type parsing), so the
// caller can compare the two answers byte for byte. One JSON document on stdout.
//   node pg_cache.mjs DATABASE_URL SQL [PARAM]
import pg from 'pg'

const [url, sql, param] = process.argv.slice(2)
const raw = { getTypeParser: () => (v) => (Buffer.isBuffer(v) ? v.toString('base64') : v) }

const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10000 })
await client.connect()
const out = {}
try {
  for (const binary of [false, true]) {
    const answers = []
    for (let i = 0; i < 2; i++) {
      const r = await client.query({ text: sql, values: param === undefined ? [] : [param], binary, rowMode: 'array', types: raw })
      answers.push({ rows: r.rows, fields: r.fields.map((f) => [f.name, f.dataTypeID, f.format]) })
    }
    out[binary ? 'binary' : 'text'] = answers
  }
} finally {
  await client.end()
}
console.log(JSON.stringify(out))
