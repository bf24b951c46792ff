"""Write the sample benchmarks data/mmlu_sample (MMLU's headerless CSVs) and data/cmmlu_sample
(CMMLU's CSVs with a header row and an index column). The questions are our own; running the
script again writes the same files. Standard library only."""

from __future__ import annotations

import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "data"

# subject: (name, category, [(question, [A, B, C, D], answer)]); the first 5 are the dev split.
MMLU = {
    "arithmetic": ("arithmetic", "STEM", [
        ("What is 7 + 5?", ["10", "11", "12", "13"], "C"),
        ("What is 9 x 3?", ["27", "24", "30", "21"], "A"),
        ("What is 20 - 8?", ["14", "12", "10", "8"], "B"),
        ("What is 36 / 6?", ["5", "7", "8", "6"], "D"),
        ("What is half of 50?", ["20", "25", "30", "35"], "B"),
        ("What is 8 + 6?", ["12", "13", "14", "15"], "C"),
        ("What is 5 x 5?", ["25", "20", "30", "10"], "A"),
        ("What is 100 - 1?", ["90", "101", "98", "99"], "D"),
        ("What is 12 / 4?", ["4", "3", "2", "6"], "B"),
        ("What is 3 x 7?", ["24", "18", "21", "27"], "C"),
        ("Which number is even?", ["7", "9", "13", "10"], "D"),
        ("What is 15 + 15?", ["30", "25", "35", "40"], "A"),
        ("What is 2 to the power of 3?", ["6", "8", "9", "5"], "B"),
    ]),
    "geography": ("geography", "Social Sciences", [
        ("What is the capital of France?", ["Lyon", "Paris", "Nice", "Lille"], "B"),
        ("Which continent is Kenya in?", ["Asia", "Europe", "Africa", "Oceania"], "C"),
        ("Which ocean lies between Europe and North America?",
         ["Atlantic", "Indian", "Arctic", "Pacific"], "A"),
        ("What is the capital of Japan?", ["Osaka", "Kyoto", "Nagoya", "Tokyo"], "D"),
        ("Which country has the city of Rome?", ["Spain", "Italy", "Greece", "Portugal"], "B"),
        ("What is the capital of Italy?", ["Milan", "Naples", "Rome", "Turin"], "C"),
        ("Which river flows through Cairo?", ["Nile", "Amazon", "Danube", "Ganges"], "A"),
        ("Which continent is Brazil in?", ["Africa", "South America", "Asia", "Europe"], "B"),
        ("What is the capital of Germany?", ["Munich", "Hamburg", "Cologne", "Berlin"], "D"),
        ("Which is the largest ocean?", ["Atlantic", "Indian", "Pacific", "Arctic"], "C"),
        ("What is the capital of Canada?", ["Ottawa", "Toronto", "Vancouver", "Montreal"], "A"),
        ("Which country is an island?", ["Chile", "Iceland", "Austria", "Bolivia"], "B"),
        ("Which city is in Spain?", ["Porto", "Marseille", "Geneva", "Madrid"], "D"),
    ]),
    "literature": ("literature", "Humanities", [
        ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Jane Austen",
                                          "Mark Twain"], "B"),
        ("What is a poem of fourteen lines called?", ["haiku", "limerick", "sonnet", "ode"], "C"),
        ("Who wrote Pride and Prejudice?", ["Jane Austen", "Emily Bronte", "George Eliot",
                                             "Virginia Woolf"], "A"),
        ("Which of these is a Greek epic poem?", ["Hamlet", "Don Quixote", "Faust", "The Odyssey"], "D"),
        ("A story's main character is called the", ["narrator", "protagonist", "author", "critic"],
         "B"),
        ("Who wrote Oliver Twist?", ["Thomas Hardy", "Lewis Carroll", "Charles Dickens",
                                     "Oscar Wilde"], "C"),
        ("Which of these is a play by Shakespeare?", ["Macbeth", "Ulysses", "Beowulf",
                                                      "Frankenstein"], "A"),
        ("A three-line Japanese poem is a", ["sonnet", "haiku", "ballad", "elegy"], "B"),
        ("Who wrote Adventures of Huckleberry Finn?", ["Herman Melville", "Edgar Allan Poe",
                                                       "Henry James", "Mark Twain"], "D"),
        ("The person who tells a story is the", ["villain", "reader", "narrator", "editor"], "C"),
        ("Who wrote Alice's Adventures in Wonderland?", ["Lewis Carroll", "J. M. Barrie",
                                                         "Roald Dahl", "Beatrix Potter"], "A"),
        ("A book about a real person's life, written by someone else, is a",
         ["novel", "biography", "fable", "myth"], "B"),
        ("Which of these is a novel by Mary Shelley?", ["Dracula", "Emma", "Middlemarch",
                                                        "Frankenstein"], "D"),
    ]),
    "everyday_life": ("everyday life", "Other", [
        ("How many days are in a week?", ["5", "6", "7", "8"], "C"),
        ("What do you use to cut paper?", ["scissors", "a spoon", "a towel", "a pillow"], "A"),
        ("Which meal is eaten in the morning?", ["dinner", "breakfast", "supper", "lunch"], "B"),
        ("What colour is a ripe banana?", ["blue", "purple", "green", "yellow"], "D"),
        ("How many hours are in a day?", ["12", "24", "48", "60"], "B"),
        ("Where do you keep food cold?", ["an oven", "a toaster", "a fridge", "a kettle"], "C"),
        ("How many months are in a year?", ["12", "10", "11", "13"], "A"),
        ("What do you wear on your feet?", ["a hat", "shoes", "gloves", "a scarf"], "B"),
        ("Which season is usually the coldest?", ["summer", "spring", "autumn", "winter"], "D"),
        ("What do plants need from the sky to grow?", ["snowflakes", "moonlight", "sunlight",
                                                       "stars"], "C"),
        ("What do you use to brush your teeth?", ["a toothbrush", "a comb", "a fork", "a pen"], "A"),
        ("How many minutes are in an hour?", ["30", "60", "90", "100"], "B"),
        ("Which of these is a fruit?", ["carrot", "potato", "onion", "apple"], "D"),
    ]),
}

CMMLU = {
    "chinese_geography": ("中国地理", "Social Sciences", [
        ("中国的首都是哪座城市？", ["上海", "北京", "广州", "深圳"], "B"),
        ("长江最终流入哪一片海？", ["东海", "南海", "渤海", "黄海"], "A"),
        ("哪个省份的简称是“川”？", ["湖南", "云南", "四川", "山西"], "C"),
        ("中国面积最大的省级行政区是哪一个？", ["西藏", "青海", "内蒙古", "新疆"], "D"),
        ("黄河流经下列哪座城市？", ["兰州", "南京", "杭州", "福州"], "A"),
        ("台湾岛的东面是哪个大洋？", ["印度洋", "太平洋", "大西洋", "北冰洋"], "B"),
        ("哪座城市被称为“春城”？", ["哈尔滨", "拉萨", "昆明", "重庆"], "C"),
        ("中国最长的河流是哪一条？", ["黄河", "珠江", "淮河", "长江"], "D"),
    ]),
    "elementary_math": ("小学数学", "STEM", [
        ("3 加 4 等于多少？", ["6", "7", "8", "9"], "B"),
        ("10 减 6 等于多少？", ["4", "3", "5", "6"], "A"),
        ("6 乘 7 等于多少？", ["36", "48", "42", "49"], "C"),
        ("一个星期有几天？", ["5", "6", "8", "7"], "D"),
        ("18 除以 3 等于多少？", ["6", "5", "9", "3"], "A"),
        ("下列哪个数是奇数？", ["2", "9", "4", "8"], "B"),
        ("一米等于多少厘米？", ["10", "1000", "100", "50"], "C"),
        ("正方形有几条边？", ["3", "5", "6", "4"], "D"),
    ]),
}


def write_mmlu(root: Path) -> None:
    mapping = {}
    for key, (name, category, rows) in MMLU.items():
        mapping[key] = {"name": name, "category": category}
        for split, part in (("dev", rows[:5]), ("test", rows[5:])):
            path = root / "data" / split / f"{key}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                for question, choices, answer in part:
                    writer.writerow([question, *choices, answer])
    (root / "mapping.json").write_text(json.dumps(mapping, indent=2) + "\n", encoding="utf-8")


def write_cmmlu(root: Path) -> None:
    mapping = {}
    for key, (name, category, rows) in CMMLU.items():
        mapping[key] = {"name": name, "category": category}
        for split, part in (("dev", rows[:3]), ("test", rows[3:])):
            path = root / "data" / split / f"{key}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i, (question, choices, answer) in enumerate(part):
                    writer.writerow([i, question, *choices, answer])
    (root / "mapping.json").write_text(json.dumps(mapping, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")


if __name__ == "__main__":
    write_mmlu(ROOT / "mmlu_sample")
    write_cmmlu(ROOT / "cmmlu_sample")
