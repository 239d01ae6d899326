// Postgres.js (`postgres`) in its default mode for tests/e2e/test_pg_isolation_drivers.py: autocommit,
// every query a tagged template (a named prepared statement, Parse/Bind/Describe/Execute/Sync
// pipelined), transactions with sql.begin(), types fetched on connect, application_name
// 'postgres.js' at startup. The SQL comes from the test as text; it is run exactly as a tagged
// template would be (a strings array with .raw, `$n` turned into interpolations).
//   node postgresjs_isolation.mjs CASE DATABASE_URL [TAG]     ($ISO_SPEC: the SQL, JSON from the test)
// CASE: rollback | hold | leak | carry | params. One JSON document on stdout (hold: one line, then it waits
// to be killed, at most 60 s). Client A of `leak` is `max: 1` (one connection, so that "its session"
// means one server session); every other client has the default pool and uses one connection.
// The driver's view of the reported parameters: `sql.parameters`.
// TLS: verification on, with the CA the URL names (pg_tls.mjs).
import postgres from 'postgres'
import { postgresjsTls } from './pg_tls.mjs'

const [caseName, url, tag] = process.argv.slice(2)
const SPEC = JSON.parse(process.env.ISO_SPEC)
const TLS = postgresjsTls(url)

const connect = (options = {}) => postgres(TLS.url, { ...TLS.options, connect_timeout: 10, onnotice: () => {}, ...options })
const end = sql => sql.end({ timeout: 5 })

// sql`...` for a text with $1..$n: the parts between placeholders become the template's strings.
function tagged (sql, text, ...values) {
  const strings = []
  const args = []
  let last = 0
  for (const m of text.matchAll(/\$(\d+)/g)) {
    strings.push(text.slice(last, m.index))
    args.push(values[Number(m[1]) - 1])
    last = m.index + m[0].length
  }
  strings.push(text.slice(last))
  strings.raw = [...strings]
  return sql(strings, ...args)
}

const error = e => `error ${e.code}: ${String(e.message).split('\n')[0]}`
const first = async (sql, text, ...values) => (await tagged(sql, text, ...values))[0] ?? null

async function step (sql, text) {
  try {
    const row = await first(sql, text)
    return { ok: true, pid: row?.pid ?? null }
  } catch (e) {
    return { ok: false, error: error(e) }
  }
}

async function probe (sql) {
  try { return { ...await first(sql, SPEC.probe) } } catch (e) { return { error: error(e) } }
}

function view (sql) {
  return Object.fromEntries(SPEC.view_keys.map(k => [k, sql.parameters[k] ?? null]))
}

async function showAll (sql) {
  const out = {}
  for (const k of SPEC.show_keys) {
    try { out[k] = Object.values(await first(sql, `SHOW ${k}`))[0] } catch (e) { out[k] = error(e) }
  }
  return out
}

// n new clients at once, each running one query inside sql.begin() and holding the transaction
// until all n have their answer (at most group_wait s): together they take every server
// connection of the pool, so the one client A used is among them.
function laterGroup (n) {
  const group = gate(n)
  return Promise.all(Array.from({ length: n }, async () => {
    const b = connect()
    let p
    let arrived = false
    const arrive = () => { if (!arrived) { arrived = true; group.arrive() } }
    try {
      await b.begin(async tx => {
        p = await probe(tx)
        arrive()
        await group.all
      })
    } catch (e) {
      p = p ?? { error: error(e) }
    } finally {
      arrive()
      await end(b)
    }
    return p
  }))
}

// resolves once n have arrived, or after group_wait seconds
function gate (n) {
  let arrived = 0
  let open
  const all = new Promise(resolve => { open = resolve })
  setTimeout(open, SPEC.group_wait * 1000).unref()
  return { all, arrive () { if (++arrived === n) open() } }
}

class Rollback extends Error {}

function nextLine () {
  return new Promise((resolve, reject) => {
    let buf = ''
    process.stdin.setEncoding('utf8')
    process.stdin.on('data', d => { buf += d; if (buf.includes('\n')) { process.stdin.destroy(); resolve(buf) } })
    process.stdin.on('end', () => reject(new Error('stdin closed before the test said go')))
  })
}

const cases = {
  async rollback () {
    const sql = connect()
    try {
      let inside, pid
      try {
        await sql.begin(async tx => {
          for (let i = 0; i < 3; i++) await tagged(tx, SPEC.insert, tag, 'rolled back')
          inside = (await first(tx, SPEC.count, tag)).n
          pid = (await first(tx, 'select pg_backend_pid() as pid')).pid
          throw new Rollback()
        })
      } catch (e) {
        if (!(e instanceof Rollback)) throw e
      }
      await tagged(sql, SPEC.insert, tag, 'kept')
      return { inside, pids: [pid] }
    } finally {
      await end(sql)
    }
  },

  async hold () {
    const sql = connect()
    await sql.begin(async tx => {
      for (let i = 0; i < 3; i++) await tagged(tx, SPEC.insert, tag, 'uncommitted')
      const inside = (await first(tx, SPEC.count, tag)).n
      const pid = (await first(tx, 'select pg_backend_pid() as pid')).pid
      console.log(JSON.stringify({ pid, inside }))
      await new Promise(resolve => setTimeout(resolve, 60000)) // killed long before
    })
    process.exit(3)
  },

  async leak () {
    let a = connect({ max: 1 })
    const out = { later: [] }
    try {
      out.a_first = await probe(a)
      out.a_steps = {}
      for (const [name, text] of SPEC.a_steps) out.a_steps[name] = await step(a, text)
      out.a_next = await probe(a)
      for (let first = 0; first < SPEC.later; first += SPEC.group) {
        if (first === SPEC.while_connected) { await end(a); a = null }
        out.later.push(...await laterGroup(Math.min(SPEC.group, SPEC.later - first)))
      }
    } finally {
      if (a) await end(a)
    }
    return out
  },

  // A sets its state, checks it in its next transaction, prints one line and waits for one on
  // stdin (the test takes every origin connection away meanwhile), then checks it once more.
  async carry () {
    const a = connect({ max: 1 })
    try {
      const out = { a_first: await probe(a), a_steps: {} }
      for (const [name, text] of SPEC.a_steps) out.a_steps[name] = await step(a, text)
      out.a_next = await probe(a)
      console.log(JSON.stringify({ paused: true }))
      await nextLine()
      out.a_moved = await probe(a)
      return out
    } finally {
      await end(a)
    }
  },

  async params () {
    const sql = connect({ max: 1 })
    try {
      const fresh = { show: await showAll(sql), view: view(sql) }
      const steps = {}
      for (const [name, text] of SPEC.param_steps) steps[name] = await step(sql, text)
      const after = { show: await showAll(sql), view: view(sql) }
      let roundtrip
      try {
        const row = await first(sql, SPEC.roundtrip[0], SPEC.roundtrip[1])
        roundtrip = [row.t, row.n]
      } catch (e) { roundtrip = error(e) }
      return { fresh, steps, after, roundtrip }
    } finally {
      await end(sql)
    }
  }
}

const run = cases[caseName]
if (!run) {
  console.error(`unknown case ${caseName}; one of ${Object.keys(cases).join(', ')}`)
  process.exit(2)
}
const timer = setTimeout(() => { console.error(`${caseName}: still running after 60 s`); process.exit(4) }, 60000)
try {
  console.log(JSON.stringify(await run()))
  clearTimeout(timer)
} catch (e) {
  console.error(`${caseName} failed: ${e.code ? `[${e.code}] ` : ''}${e.stack || e}`)
  process.exit(1)
}
