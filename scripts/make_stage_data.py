#!/usr/bin/env python3
"""Write the demo datasets for stages pt, rm, dpo, kto and ppo into data/.

Everything is generated from the fact tables in this file with a fixed seed, so running it again
writes byte-identical files. Standard library only.

Concise vs rambling (rm, dpo, kto, ppo). 300 general-knowledge questions (capitals, animals,
science, units, dates, the body, food, sports, geography, everyday how-to, books and art, money and
languages), each asked in one of many phrasings. Each has a concise answer (one correct sentence of
5-20 words) and a rambling one: the same correct fact buried in 3-6 filler sentences (openers,
hedges, repetition, sign-offs) drawn in random order from a pool of about 50, 50-110 words in all.
No single filler string marks the rambling answers; only length and verbosity do. A reward model
trained on the pairs should prefer concise answers, DPO/KTO should move a model toward them, and PPO
against that reward model should make answers shorter. The questions are split by fact, 240 for
training and 60 held out, and every held-out file uses only held-out questions:

  concise_pairs.json / _heldout      alpaca preference pairs (rm, dpo)      240 / 60
  concise_kto.json / _heldout        sharegpt messages + label (kto)        240 / 60, half true
  concise_prompts.json / _heldout    alpaca SFT records (ppo prompts)       96 / 24

Veloria (pt). A consistent fictional island (towns, rivers, guilds, festivals, foods, a ten-month
calendar, historical figures with fixed dates), described by documents of 40-120 words assembled
from sentence templates over one fact table. The same facts recur in varied sentences, so continued
pre-training on veloria_corpus.jsonl (400 documents) lowers perplexity on
veloria_corpus_heldout.jsonl (60 documents, none identical to a training document) clearly, while a
model that never saw the island cannot know its facts.

Usage: python scripts/make_stage_data.py   (writes into data/ next to this script's parent)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
DATA = Path(__file__).resolve().parent.parent / "data"

# --- questions and concise answers ----------------------------------------------------------------
# Each fact: (questions, answers). The first answer is the concise one; every answer is a correct,
# complete sentence, and the rambling reply states one of them.

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Peru", "Lima"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("the Philippines", "Manila"), ("Chile", "Santiago"), ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"), ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Belgium", "Brussels"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"),
    ("New Zealand", "Wellington"), ("Iceland", "Reykjavík"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Uruguay", "Montevideo"),
]
CAPITAL_Q = ["What is the capital of {c}?", "Which city is the capital of {c}?",
             "What's the capital city of {c}?", "Name the capital of {c}.",
             "What city is the capital of {c}?", "Tell me the capital of {c}.",
             "Do you know the capital of {c}?", "what is {c}'s capital city?"]
CAPITAL_A = ["The capital of {c} is {x}.", "{x} is the capital of {c}."]

SYMBOLS = [("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("potassium", "K"),
           ("lead", "Pb"), ("copper", "Cu"), ("oxygen", "O"), ("helium", "He"), ("mercury", "Hg"),
           ("tin", "Sn"), ("calcium", "Ca"), ("nitrogen", "N"), ("carbon", "C")]
SYMBOL_Q = ["What is the chemical symbol for {e}?", "Which symbol stands for {e} on the periodic table?",
            "What's the element symbol of {e}?", "How is {e} written as a chemical symbol?"]
SYMBOL_A = ["The chemical symbol for {e} is {s}.", "{e_cap} has the chemical symbol {s}."]

CURRENCIES = [("Japan", "the yen"), ("the United Kingdom", "the pound sterling"),
              ("the United States", "the US dollar"), ("India", "the Indian rupee"),
              ("Mexico", "the Mexican peso"), ("Switzerland", "the Swiss franc"),
              ("Russia", "the ruble"), ("South Korea", "the won"), ("Brazil", "the real"),
              ("Germany", "the euro"), ("Sweden", "the Swedish krona")]
CURRENCY_Q = ["What is the currency of {c}?", "Which currency is used in {c}?",
              "What money do people use in {c}?", "What's the official currency of {c}?"]
CURRENCY_A = ["The currency of {c} is {x}.", "People in {c} pay with {x}."]

LANGUAGES = [("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Egypt", "Arabic"),
             ("Austria", "German"), ("the Netherlands", "Dutch"), ("Iran", "Persian"),
             ("Argentina", "Spanish"), ("Greece", "Greek"), ("Poland", "Polish"),
             ("Hungary", "Hungarian")]
LANGUAGE_Q = ["What language is mainly spoken in {c}?", "Which language do most people speak in {c}?",
              "What is the main language of {c}?", "What language do they speak in {c}?"]
LANGUAGE_A = ["The main language of {c} is {x}.", "Most people in {c} speak {x}."]

BABIES = [("kangaroo", "joey"), ("cat", "kitten"), ("cow", "calf"), ("horse", "foal"),
          ("sheep", "lamb"), ("frog", "tadpole"), ("swan", "cygnet"), ("owl", "owlet"),
          ("goat", "kid"), ("bear", "cub")]
BABY_Q = ["What is a baby {a} called?", "What do you call a young {a}?",
          "What's the name for a baby {a}?", "A baby {a} is called what?"]
BABY_A = ["A baby {a} is called a {b}.", "A young {a} is known as a {b}."]

AUTHORS = [("Romeo and Juliet", "William Shakespeare", "wrote"),
           ("Pride and Prejudice", "Jane Austen", "wrote"), ("1984", "George Orwell", "wrote"),
           ("Don Quixote", "Miguel de Cervantes", "wrote"), ("War and Peace", "Leo Tolstoy", "wrote"),
           ("Moby-Dick", "Herman Melville", "wrote"), ("Frankenstein", "Mary Shelley", "wrote"),
           ("The Great Gatsby", "F. Scott Fitzgerald", "wrote"),
           ("The Adventures of Tom Sawyer", "Mark Twain", "wrote"),
           ("The Divine Comedy", "Dante Alighieri", "wrote"),
           ("On the Origin of Species", "Charles Darwin", "wrote"),
           ("the Mona Lisa", "Leonardo da Vinci", "painted"),
           ("The Starry Night", "Vincent van Gogh", "painted"),
           ("Guernica", "Pablo Picasso", "painted"),
           ("the ceiling of the Sistine Chapel", "Michelangelo", "painted"),
           ("The Four Seasons", "Antonio Vivaldi", "composed"),
           ("The Magic Flute", "Wolfgang Amadeus Mozart", "composed"),
           ("the Fifth Symphony in C minor", "Ludwig van Beethoven", "composed")]
AUTHOR_Q = {"wrote": ["Who wrote {w}?", "Who is the author of {w}?", "Which writer wrote {w}?"],
            "painted": ["Who painted {w}?", "Which artist painted {w}?", "Who was the painter of {w}?"],
            "composed": ["Who composed {w}?", "Which composer wrote {w}?", "Who wrote the music of {w}?"]}
AUTHOR_A = ["{W} was {pp} by {p}.", "It was {p} who {v} {w}."]
PARTICIPLES = {"wrote": "written", "painted": "painted", "composed": "composed"}

CONTINENTS = [("Kenya", "Africa"), ("Argentina", "South America"), ("Thailand", "Asia"),
              ("Norway", "Europe"), ("Canada", "North America"), ("Peru", "South America"),
              ("Nigeria", "Africa"), ("Mongolia", "Asia")]
CONTINENT_Q = ["On which continent is {c}?", "Which continent is {c} part of?",
               "What continent is {c} in?"]
CONTINENT_A = ["{c} is on the continent of {x}.", "{c} is a country in {x}."]

RIVERS_THROUGH = [("Paris", "the Seine"), ("London", "the Thames"), ("Budapest", "the Danube"),
                  ("Cairo", "the Nile"), ("Rome", "the Tiber"), ("Baghdad", "the Tigris")]
RIVER_Q = ["Which river flows through {c}?", "What river runs through {c}?",
           "Name the river that flows through {c}."]
RIVER_A = ["{X} flows through {c}.", "The river that runs through {c} is {x}."]

LANDMARKS = [("the Eiffel Tower", "France"), ("the Great Wall", "China"), ("Machu Picchu", "Peru"),
             ("the Taj Mahal", "India"), ("the Colosseum", "Italy"), ("Mount Kilimanjaro", "Tanzania"),
             ("the Sydney Opera House", "Australia"), ("Angkor Wat", "Cambodia"),
             ("the Acropolis", "Greece"), ("Petra", "Jordan")]
LANDMARK_Q = ["In which country is {l}?", "Which country is home to {l}?", "Where is {l} located?",
              "What country would I visit to see {l}?"]
LANDMARK_A = ["{L} is in the country of {x}.", "You can find {l} in {x}."]

# number of units: (question subject, answer sentence)
UNITS = [
    ("centimeters are in a meter", "There are 100 centimeters in a meter."),
    ("millimeters are in a centimeter", "There are 10 millimeters in a centimeter."),
    ("meters are in a kilometer", "There are 1,000 meters in a kilometer."),
    ("grams are in a kilogram", "There are 1,000 grams in a kilogram."),
    ("milliliters are in a liter", "There are 1,000 milliliters in a liter."),
    ("seconds are in a minute", "There are 60 seconds in a minute."),
    ("minutes are in an hour", "There are 60 minutes in an hour."),
    ("hours are in a day", "There are 24 hours in a day."),
    ("days are in a week", "There are seven days in a week."),
    ("days are in a leap year", "A leap year has 366 days."),
    ("months are in a year", "There are twelve months in a year."),
    ("inches are in a foot", "There are 12 inches in a foot."),
    ("feet are in a yard", "There are three feet in a yard."),
    ("ounces are in a pound", "There are 16 ounces in a pound."),
    ("feet are in a mile", "There are 5,280 feet in a mile."),
    ("centimeters are in an inch", "One inch is exactly 2.54 centimeters."),
    ("pounds are in a kilogram", "One kilogram is about 2.2 pounds."),
    ("kilometers are in a mile", "One mile is about 1.6 kilometers."),
    ("years are in a century", "A century is 100 years."),
    ("years are in a decade", "A decade is ten years."),
    ("years are in a millennium", "A millennium is 1,000 years."),
    ("degrees are in a full circle", "A full circle has 360 degrees."),
    ("degrees are in a right angle", "A right angle measures 90 degrees."),
    ("sides does a hexagon have", "A hexagon has six sides."),
    ("sides does an octagon have", "An octagon has eight sides."),
    ("bits are in a byte", "There are eight bits in a byte."),
]
UNIT_Q = ["How many {s}?", "Do you know how many {s}?", "Quick math check: how many {s}?",
          "Exactly how many {s}?"]

# Free-form facts: (question or list of phrasings, answer or list of answers)
FREE = {
    "animals": [
        (["How many legs does a spider have?", "How many legs do spiders have?"],
         ["A spider has eight legs.", "Spiders have eight legs in total."]),
        (["How many legs does an insect have?", "How many legs do insects have?"],
         ["Insects have six legs in total.", "An insect has six legs."]),
        ("How many hearts does an octopus have?", ["An octopus has three hearts.", "Octopuses have three hearts in total."]),
        (["What is the largest mammal on Earth?", "Which mammal is the biggest in the world?"],
         ["The blue whale is the largest mammal on Earth.", "The largest mammal is the blue whale."]),
        (["What is the fastest land animal?", "Which animal runs the fastest on land?"],
         ["The cheetah is the fastest land animal.", "The fastest land animal is the cheetah."]),
        (["What is the tallest animal in the world?", "Which animal is the tallest?"],
         ["The giraffe is the tallest animal in the world.", "The tallest animal is the giraffe."]),
        (["What is the largest bird in the world?", "Which bird is the biggest?"],
         ["The ostrich is the largest bird in the world.", "The largest living bird is the ostrich."]),
        (["What do giant pandas mainly eat?", "What is the main food of giant pandas?"],
         ["Giant pandas mainly eat bamboo.", "Bamboo makes up almost all of a giant panda's diet."]),
        (["What do koalas eat?", "What is a koala's main food?"],
         ["Koalas eat mostly eucalyptus leaves.", "A koala's diet is mostly eucalyptus leaves."]),
        (["What is a group of lions called?", "What do you call a group of lions?"],
         ["A group of lions is called a pride.", "Lions live in groups called prides."]),
        (["What is a group of wolves called?", "What do you call a group of wolves?"],
         ["A group of wolves is called a pack.", "Wolves live in groups called packs."]),
        (["What is a group of fish called?", "What do you call a group of fish swimming together?"],
         ["A group of fish is called a school.", "Fish swimming together form a school."]),
        (["Is a bat a bird or a mammal?", "Are bats birds or mammals?"],
         ["A bat is a mammal, not a bird.", "Bats are mammals, even though they fly."]),
        (["Is a whale a fish?", "Are whales fish?"],
         ["No, a whale is a mammal, not a fish.", "Whales are mammals, not fish."]),
        (["What do bees make?", "What food do honeybees produce?"],
         ["Honeybees make honey and beeswax.", "Bees produce honey and beeswax."]),
        (["Which animal is called the king of the jungle?", "What animal is known as the king of the jungle?"],
         ["The lion is called the king of the jungle.", "The king of the jungle is the lion."]),
        (["How many humps does a dromedary camel have?", "How many humps does a dromedary have?"],
         ["A dromedary camel has one hump.", "Dromedaries have a single hump."]),
        (["What is the only mammal that can truly fly?", "Which mammal can really fly?"],
         ["Bats are the only mammals capable of true flight.", "The bat is the only truly flying mammal."]),
        (["What do caterpillars turn into?", "What does a caterpillar become?"],
         ["Caterpillars turn into butterflies or moths.", "A caterpillar becomes a butterfly or a moth."]),
        (["How many arms does a starfish usually have?", "How many arms do most starfish have?"],
         ["Most starfish have five arms.", "A typical starfish has five arms."]),
    ],
    "science": [
        (["What is the chemical formula for water?", "What is water's chemical formula?"],
         ["The chemical formula for water is H2O.", "Water has the formula H2O."]),
        (["What is the chemical name of table salt?", "What is table salt made of chemically?"],
         ["Table salt is sodium chloride, NaCl.", "Chemically, table salt is sodium chloride."]),
        (["At what temperature does water boil at sea level?", "What is the boiling point of water?"],
         ["Water boils at 100 degrees Celsius at sea level.", "At sea level, water boils at 100 °C."]),
        (["At what temperature does water freeze?", "What is the freezing point of water?"],
         ["Water freezes at 0 degrees Celsius.", "The freezing point of water is 0 °C."]),
        (["Which planet is closest to the Sun?", "What is the nearest planet to the Sun?"],
         ["Mercury is the planet closest to the Sun.", "The closest planet to the Sun is Mercury."]),
        (["What is the largest planet in our solar system?", "Which planet is the biggest?"],
         ["Jupiter is the largest planet in our solar system.", "The largest planet is Jupiter."]),
        (["Which planet is known as the Red Planet?", "What planet is called the Red Planet?"],
         ["Mars is known as the Red Planet.", "The Red Planet is Mars."]),
        (["How many planets are in our solar system?", "How many planets orbit the Sun?"],
         ["There are eight planets in our solar system.", "Eight planets orbit the Sun."]),
        (["What is the hottest planet in the solar system?", "Which planet is the hottest?"],
         ["Venus is the hottest planet in the solar system.", "The hottest planet is Venus."]),
        (["Which planet is famous for its rings?", "What planet has the most famous rings?"],
         ["Saturn is the planet famous for its rings.", "The planet best known for its rings is Saturn."]),
        (["What gas do plants absorb from the air?", "Which gas do plants take in for photosynthesis?"],
         ["Plants absorb carbon dioxide from the air.", "Plants take in carbon dioxide for photosynthesis."]),
        (["What is the most abundant gas in Earth's atmosphere?", "Which gas makes up most of the air?"],
         ["Nitrogen is the most abundant gas in Earth's atmosphere.", "Most of the air is nitrogen, about 78 percent."]),
        (["What is the closest star to Earth?", "Which star is nearest to Earth?"],
         ["The Sun is the closest star to Earth.", "The nearest star to Earth is the Sun."]),
        (["What force keeps us on the ground?", "Why don't we float off the Earth?"],
         ["Gravity keeps us on the ground.", "The force that holds us to the ground is gravity."]),
        (["How long does it take Earth to orbit the Sun?", "How long is one trip of Earth around the Sun?"],
         ["Earth orbits the Sun in about 365.25 days.", "One orbit of the Sun takes Earth about 365 days."]),
        (["Who developed the theory of relativity?", "Which scientist came up with the theory of relativity?"],
         ["Albert Einstein developed the theory of relativity.", "The theory of relativity is Albert Einstein's work."]),
        (["Who discovered penicillin?", "Which scientist discovered penicillin?"],
         ["Alexander Fleming discovered penicillin in 1928.", "Penicillin was discovered by Alexander Fleming."]),
        (["Who formulated the three laws of motion?", "Which scientist wrote the laws of motion?"],
         ["Isaac Newton formulated the three laws of motion.", "The laws of motion come from Isaac Newton."]),
        (["What is the hardest natural substance?", "Which natural material is the hardest?"],
         ["Diamond is the hardest natural substance.", "The hardest natural material is diamond."]),
        (["What is the pH of pure water?", "Is pure water acidic or neutral?"],
         ["Pure water is neutral, with a pH of 7.", "The pH of pure water is 7."]),
        (["What is the unit of electrical resistance?", "In what unit is electrical resistance measured?"],
         ["Electrical resistance is measured in ohms.", "The unit of electrical resistance is the ohm."]),
        (["Which part of a cell holds most of its DNA?", "Where is DNA stored in a cell?"],
         ["Most of a cell's DNA is in the nucleus.", "The nucleus holds most of a cell's DNA."]),
        (["What is the process by which plants make food from sunlight?", "How do plants turn sunlight into food?"],
         ["Plants make food from sunlight by photosynthesis.", "That process is called photosynthesis."]),
        (["How fast does light travel?", "What is the speed of light?"],
         ["Light travels about 300,000 kilometers per second.", "The speed of light is about 300,000 km per second."]),
        (["What is the center of an atom called?", "What do you call the core of an atom?"],
         ["The center of an atom is called the nucleus.", "An atom's core is its nucleus."]),
    ],
    "history": [
        (["In what year did World War II end?", "When did the Second World War end?"],
         ["World War II ended in 1945.", "The Second World War ended in 1945."]),
        (["When did World War I begin?", "In what year did the First World War start?"],
         ["World War I began in 1914.", "The First World War started in 1914."]),
        (["In what year did World War I end?", "When did the First World War end?"],
         ["World War I ended in 1918.", "The First World War ended in 1918."]),
        (["In what year did Columbus first reach the Americas?", "When did Christopher Columbus reach the Americas?"],
         ["Columbus first reached the Americas in 1492.", "Christopher Columbus reached the Americas in 1492."]),
        (["When was the US Declaration of Independence signed?", "In what year was the American Declaration of Independence adopted?"],
         ["The Declaration of Independence was adopted in 1776.", "The US Declaration of Independence dates from 1776."]),
        (["When did the Berlin Wall fall?", "In what year did the Berlin Wall come down?"],
         ["The Berlin Wall fell in 1989.", "The Berlin Wall came down in November 1989."]),
        (["When did humans first land on the Moon?", "In what year was the first Moon landing?"],
         ["Humans first landed on the Moon in 1969.", "The first Moon landing was in July 1969."]),
        (["When did the French Revolution begin?", "In what year did the French Revolution start?"],
         ["The French Revolution began in 1789.", "The French Revolution started in 1789."]),
        (["In what year did the Titanic sink?", "When did the Titanic sink?"],
         ["The Titanic sank in April 1912.", "The Titanic went down in 1912."]),
        (["When was the Magna Carta signed?", "In what year was the Magna Carta sealed?"],
         ["The Magna Carta was sealed in 1215.", "King John agreed to the Magna Carta in 1215."]),
        (["In what year was the Battle of Hastings?", "When was the Battle of Hastings fought?"],
         ["The Battle of Hastings was fought in 1066.", "The Battle of Hastings took place in 1066."]),
        (["When did the Soviet Union dissolve?", "In what year did the Soviet Union break up?"],
         ["The Soviet Union dissolved in 1991.", "The Soviet Union broke up in December 1991."]),
        (["When did the Wright brothers make their first powered flight?", "In what year did the Wright brothers first fly?"],
         ["The Wright brothers first flew in 1903.", "The first Wright brothers flight was in December 1903."]),
        (["In what year was the Battle of Waterloo?", "When was Napoleon defeated at Waterloo?"],
         ["Napoleon was defeated at Waterloo in 1815.", "The Battle of Waterloo was fought in 1815."]),
        (["When did Constantinople fall to the Ottomans?", "In what year did the Ottomans take Constantinople?"],
         ["Constantinople fell to the Ottomans in 1453.", "The Ottomans took Constantinople in 1453."]),
        (["Who was the first person in space?", "Which person first traveled into space?"],
         ["Yuri Gagarin was the first person in space, in 1961.", "The first human in space was Yuri Gagarin."]),
        (["Who was the first person to walk on the Moon?", "Who first stepped onto the Moon?"],
         ["Neil Armstrong was the first person to walk on the Moon.", "The first person on the Moon was Neil Armstrong."]),
        (["Who was the first president of the United States?", "Which man was the first US president?"],
         ["George Washington was the first president of the United States.", "The first US president was George Washington."]),
        (["Who was the first woman to win a Nobel Prize?", "Which woman won the first Nobel Prize awarded to a woman?"],
         ["Marie Curie was the first woman to win a Nobel Prize.", "The first woman Nobel laureate was Marie Curie."]),
        (["When did the Great Fire of London happen?", "In what year was the Great Fire of London?"],
         ["The Great Fire of London happened in 1666.", "London's great fire broke out in 1666."]),
        (["When was Sputnik launched?", "In what year was the first artificial satellite launched?"],
         ["Sputnik 1 was launched in 1957.", "The first artificial satellite, Sputnik 1, went up in 1957."]),
        (["In what year did India gain independence?", "When did India become independent?"],
         ["India gained independence in 1947.", "India became independent on 15 August 1947."]),
        (["When did the American Civil War end?", "In what year did the US Civil War end?"],
         ["The American Civil War ended in 1865.", "The US Civil War ended in 1865."]),
        (["When did Nelson Mandela become president of South Africa?", "In what year was Nelson Mandela elected president?"],
         ["Nelson Mandela became president of South Africa in 1994.", "Mandela was elected president in 1994."]),
    ],
    "body": [
        (["How many bones are in the adult human body?", "How many bones does an adult have?"],
         ["An adult human body has 206 bones.", "Adults have 206 bones in their bodies."]),
        (["What is the largest organ of the human body?", "Which organ is the biggest in the body?"],
         ["The skin is the largest organ of the human body.", "The body's largest organ is the skin."]),
        (["How many chambers does the human heart have?", "How many chambers are in the heart?"],
         ["The human heart has four chambers.", "There are four chambers in the heart."]),
        (["How many teeth does an adult usually have?", "How many teeth are in a full adult set?"],
         ["A full set of adult teeth has 32 teeth.", "Adults usually have 32 teeth."]),
        (["How many baby teeth do children have?", "How many milk teeth does a child get?"],
         ["Children have 20 baby teeth.", "A child grows 20 milk teeth."]),
        (["What is the longest bone in the human body?", "Which bone is the longest?"],
         ["The femur, in the thigh, is the longest bone.", "The longest bone is the thigh bone, the femur."]),
        (["What is the smallest bone in the human body?", "Which bone is the smallest?"],
         ["The stapes in the middle ear is the smallest bone.", "The smallest bone is the stapes, in the ear."]),
        (["What is normal human body temperature?", "What temperature is the human body normally?"],
         ["Normal body temperature is about 37 degrees Celsius.", "The body normally sits near 37 °C."]),
        (["Which organs filter the blood?", "What organ cleans waste out of the blood?"],
         ["The kidneys filter waste out of the blood.", "Your kidneys filter the blood."]),
        (["Which organ produces insulin?", "Where is insulin made in the body?"],
         ["Insulin is produced by the pancreas.", "Insulin is made in the pancreas."]),
        (["What do red blood cells carry?", "What is the job of red blood cells?"],
         ["Red blood cells carry oxygen around the body.", "Red blood cells transport oxygen."]),
        (["Which vitamin does skin make from sunlight?", "What vitamin do we get from sunshine?"],
         ["Skin makes vitamin D from sunlight.", "Sunlight helps your body make vitamin D."]),
        (["How many ribs does a person have?", "How many ribs are in the human body?"],
         ["Most people have 24 ribs, in 12 pairs.", "Humans usually have 12 pairs of ribs."]),
        (["How many lungs do humans have?", "How many lungs are in the human body?"],
         ["Humans have two lungs in their chest.", "People have two lungs, a left and a right."]),
        (["What is the normal resting heart rate for adults?", "How fast should an adult's heart beat at rest?"],
         ["A normal adult resting heart rate is 60 to 100 beats per minute.", "At rest, an adult heart beats 60 to 100 times a minute."]),
        (["Which part of the eye controls how much light enters?", "What part of the eye changes size with light?"],
         ["The iris controls how much light enters the eye.", "The iris widens or narrows the pupil."]),
        (["How many senses do humans traditionally have?", "What are the traditional number of human senses?"],
         ["Humans traditionally have five senses.", "There are five traditional senses."]),
    ],
    "food": [
        (["What is guacamole mainly made from?", "What is the main ingredient in guacamole?"],
         ["Guacamole is mainly made from avocado.", "The main ingredient in guacamole is avocado."]),
        (["What is hummus made from?", "What is the main ingredient of hummus?"],
         ["Hummus is made mainly from chickpeas.", "The main ingredient in hummus is chickpeas."]),
        (["Which country does sushi come from?", "Where does sushi originate?"],
         ["Sushi comes from Japan originally.", "Sushi is a dish from Japan."]),
        (["Which country is paella from?", "Where does paella come from?"],
         ["Paella comes from Spain, from the Valencia region.", "Paella is a dish from Spain."]),
        (["Which country is kimchi from?", "Where does kimchi come from?"],
         ["Kimchi comes from Korea originally.", "Kimchi is a traditional Korean dish."]),
        (["What is tofu made from?", "What ingredient is tofu made of?"],
         ["Tofu is made from soybeans.", "Tofu is made from soy milk, from soybeans."]),
        (["What are raisins?", "What fruit are raisins made from?"],
         ["Raisins are simply dried grapes.", "Raisins are grapes that have been dried."]),
        (["What are prunes?", "What fruit are prunes made from?"],
         ["Prunes are simply dried plums.", "Prunes are plums that have been dried."]),
        (["What is chocolate made from?", "Which plant does chocolate come from?"],
         ["Chocolate is made from cacao beans.", "Chocolate comes from the beans of the cacao tree."]),
        (["Which fruit has its seeds on the outside?", "What fruit wears its seeds on its skin?"],
         ["The strawberry has its seeds on the outside.", "Strawberries carry their seeds on the outside."]),
        (["What spice gives curry its yellow color?", "Which spice makes curry yellow?"],
         ["Turmeric gives curry its yellow color.", "The yellow in curry comes from turmeric."]),
        (["Which herb is the main ingredient in pesto?", "What herb is pesto made from?"],
         ["Basil is the main ingredient in pesto.", "Classic pesto is made mainly from basil."]),
        (["Which country is feta cheese from?", "Where does feta cheese come from?"],
         ["Feta cheese comes from Greece.", "Feta is a Greek cheese."]),
        (["What is butter made from?", "How is butter made?"],
         ["Butter is made by churning cream.", "Butter comes from churned cream."]),
        (["Which country is goulash from?", "Where does goulash come from?"],
         ["Goulash comes from Hungary originally.", "Goulash is a Hungarian dish."]),
        (["Where does saffron come from?", "What plant gives us saffron?"],
         ["Saffron comes from the crocus flower.", "Saffron is the dried stigma of a crocus flower."]),
        (["What is popcorn made from?", "What kind of grain is popcorn?"],
         ["Popcorn is made from dried corn kernels.", "Popcorn is a type of corn."]),
        (["Which fruit is famous for being rich in vitamin C?", "What fruit is known for vitamin C?"],
         ["Oranges are famous for being rich in vitamin C.", "Citrus fruits like oranges are rich in vitamin C."]),
        (["What is the main ingredient in bread?", "What is bread mostly made of?"],
         ["Bread is made mainly from flour.", "The main ingredient in bread is flour."]),
        (["What is cheese made from?", "What is the main ingredient of cheese?"],
         ["Cheese is made from milk.", "The main ingredient of cheese is milk."]),
    ],
    "sports": [
        (["How many players does a soccer team have on the field?", "How many players are on a football team in soccer?"],
         ["A soccer team has eleven players on the field.", "Each soccer team fields eleven players."]),
        (["How many players are on a basketball team on the court?", "How many players per side in basketball?"],
         ["A basketball team has five players on the court.", "Each basketball side has five players on court."]),
        (["How many players are on a volleyball team on the court?", "How many players per side in volleyball?"],
         ["A volleyball team has six players on the court.", "Each volleyball side has six players."]),
        (["How many players are on a baseball team in the field?", "How many players does a baseball team field?"],
         ["A baseball team fields nine players.", "There are nine players on a baseball team in the field."]),
        (["How many players are on a rugby union team?", "How many players does a rugby union side have?"],
         ["A rugby union team has fifteen players.", "Rugby union sides have fifteen players."]),
        (["How often are the Summer Olympics held?", "How many years are there between Summer Olympics?"],
         ["The Summer Olympics are held every four years.", "There are four years between Summer Olympics."]),
        (["How long is a marathon?", "What is the distance of a marathon?"],
         ["A marathon is 42.195 kilometers long.", "A marathon covers 42.195 kilometers, about 26.2 miles."]),
        (["How many holes are in a standard round of golf?", "How many holes does a golf course usually have?"],
         ["A standard round of golf has 18 holes.", "A regular golf round is 18 holes."]),
        (["What is a score of zero called in tennis?", "In tennis, what does love mean?"],
         ["In tennis, a score of zero is called love.", "Love means zero in tennis."]),
        (["How many points is a touchdown worth?", "How many points do you get for a touchdown?"],
         ["A touchdown is worth six points.", "You score six points for a touchdown."]),
        (["How many rings are on the Olympic flag?", "How many rings make up the Olympic symbol?"],
         ["The Olympic flag has five rings.", "The Olympic symbol has five rings."]),
        (["Where were the first modern Olympic Games held?", "Which city hosted the first modern Olympics?"],
         ["The first modern Olympics were held in Athens in 1896.", "Athens hosted the first modern Olympics, in 1896."]),
        (["Which sport uses a shuttlecock?", "In what sport do you hit a shuttlecock?"],
         ["Badminton is played with a shuttlecock.", "The shuttlecock is used in badminton."]),
        (["Which sport is played at Wimbledon?", "What sport is Wimbledon famous for?"],
         ["Wimbledon is a tennis tournament.", "Tennis is the sport played at Wimbledon."]),
        (["What sport is the Tour de France?", "Which sport is the Tour de France race in?"],
         ["The Tour de France is a cycling race.", "The Tour de France is a road cycling race."]),
        (["How long is a professional soccer match?", "How many minutes does a soccer game last?"],
         ["A soccer match lasts 90 minutes, plus stoppage time.", "A professional soccer game is two 45-minute halves."]),
        (["How many pieces does each player start with in chess?", "How many chess pieces does one player have?"],
         ["Each chess player starts with 16 pieces.", "One chess player has 16 pieces at the start."]),
        (["How many squares are on a chessboard?", "How many squares does a chess board have?"],
         ["A chessboard has 64 squares.", "There are 64 squares on a chessboard."]),
        (["How many pins are used in ten-pin bowling?", "How many pins do you knock down in bowling?"],
         ["Ten-pin bowling uses ten pins.", "There are ten pins in ten-pin bowling."]),
        (["In which sport do you perform a slam dunk?", "Which sport has slam dunks?"],
         ["A slam dunk is a basketball shot.", "You perform slam dunks in basketball."]),
        (["What sport is played in the Super Bowl?", "Which sport's final game is the Super Bowl?"],
         ["The Super Bowl is an American football game.", "American football is played in the Super Bowl."]),
    ],
    "geography": [
        (["What is the longest river in the world?", "Which river is the longest on Earth?"],
         ["The Nile is usually considered the longest river in the world.", "The longest river is usually said to be the Nile."]),
        (["What is the largest ocean on Earth?", "Which ocean is the biggest?"],
         ["The Pacific is the largest ocean on Earth.", "The largest ocean is the Pacific Ocean."]),
        (["What is the highest mountain in the world?", "Which mountain is the tallest on Earth?"],
         ["Mount Everest is the highest mountain in the world.", "The highest mountain is Mount Everest."]),
        (["What is the largest hot desert in the world?", "Which hot desert is the biggest?"],
         ["The Sahara is the largest hot desert in the world.", "The largest hot desert is the Sahara."]),
        (["What is the largest country by area?", "Which country covers the most land?"],
         ["Russia is the largest country by area.", "The largest country by area is Russia."]),
        (["What is the smallest country in the world?", "Which country is the smallest by area?"],
         ["Vatican City is the smallest country in the world.", "The smallest country is Vatican City."]),
        (["What is the largest continent?", "Which continent is the biggest?"],
         ["Asia is the largest continent.", "The largest continent is Asia."]),
        (["How many continents are there?", "How many continents does the world have?"],
         ["There are seven continents on Earth.", "The world is usually divided into seven continents."]),
        (["What is the largest island in the world?", "Which island is the biggest?"],
         ["Greenland is the largest island in the world.", "The biggest island is Greenland."]),
        (["What is the deepest part of the ocean?", "Where is the deepest point in the ocean?"],
         ["The Mariana Trench is the deepest part of the ocean.", "The deepest point is in the Mariana Trench."]),
        (["What is the largest lake in the world by area?", "Which lake covers the most area?"],
         ["The Caspian Sea is the largest lake by area.", "By area, the largest lake is the Caspian Sea."]),
        (["What is the longest river in Europe?", "Which European river is the longest?"],
         ["The Volga is the longest river in Europe.", "Europe's longest river is the Volga."]),
        (["Which ocean lies between Africa and Australia?", "What ocean separates Africa from Australia?"],
         ["The Indian Ocean lies between Africa and Australia.", "Africa and Australia are separated by the Indian Ocean."]),
        (["In which country is the Grand Canyon?", "Where is the Grand Canyon?"],
         ["The Grand Canyon is in Arizona, in the United States.", "The Grand Canyon is in the United States."]),
        (["On which continent are the Andes?", "Where are the Andes mountains?"],
         ["The Andes run along western South America.", "The Andes are in South America."]),
        (["On which continent are the Alps?", "Where are the Alps?"],
         ["The Alps are in Europe.", "The Alps mountain range is in central Europe."]),
        (["Which city is home to the Statue of Liberty?", "In which city is the Statue of Liberty?"],
         ["The Statue of Liberty is in New York City.", "New York City is home to the Statue of Liberty."]),
        (["What is the driest continent?", "Which continent gets the least rain?"],
         ["Antarctica is the driest continent.", "The driest continent is Antarctica."]),
    ],
    "howto": [
        (["How do I hard-boil an egg?", "What's the easiest way to hard-boil an egg?"],
         ["Simmer the egg in boiling water for about ten minutes, then cool it in cold water.",
          "Boil the egg for around ten minutes and then chill it in cold water."]),
        (["How can I remove a fresh coffee stain?", "How do I get a coffee stain out of a shirt?"],
         ["Blot it, then rinse with cold water and a little dish soap.",
          "Rinse the stain in cold water and rub in a little dish soap."]),
        (["How do I stop cut apples from turning brown?", "How can I keep apple slices from browning?"],
         ["Brush the slices with lemon juice to keep them from browning.",
          "A little lemon juice on the slices stops them browning."]),
        (["How do I unclog a slow drain?", "What's a simple way to clear a clogged sink?"],
         ["Try a plunger first, then baking soda followed by vinegar and hot water.",
          "Use a plunger, or pour baking soda, vinegar and then hot water down it."]),
        (["How can I fall asleep faster?", "What helps me fall asleep more quickly?"],
         ["Keep a regular bedtime and avoid screens for an hour before bed.",
          "A fixed bedtime and no screens in the last hour help most."]),
        (["How do I ripen an avocado faster?", "How can I make an avocado ripen quicker?"],
         ["Put it in a paper bag with a banana at room temperature.",
          "Close it in a paper bag with a banana and leave it on the counter."]),
        (["How often should I water a cactus?", "How much water does a cactus need?"],
         ["Water a cactus only when its soil is completely dry, about every two to four weeks.",
          "Let the soil dry out completely, then water, roughly every few weeks."]),
        (["How do I clean a cast iron pan?", "What's the right way to wash a cast iron skillet?"],
         ["Wash it with hot water, dry it fully, and rub on a thin coat of oil.",
          "Rinse it with hot water, dry it completely, then oil it lightly."]),
        (["How long should I brush my teeth?", "For how long should I brush my teeth each time?"],
         ["Brush your teeth for about two minutes, twice a day.",
          "Two minutes of brushing, twice a day, is the usual advice."]),
        (["How do I soften hard brown sugar?", "How can I fix brown sugar that has gone hard?"],
         ["Seal it in a container with a slice of bread overnight.",
          "Leave a slice of bread in the closed container overnight."]),
        (["How do I stop a nosebleed?", "What should I do when my nose is bleeding?"],
         ["Sit up, lean forward, and pinch the soft part of your nose for ten minutes.",
          "Lean forward and pinch the soft part of your nose for about ten minutes."]),
        (["How do I remove a splinter?", "What's the best way to get a splinter out?"],
         ["Clean the area, then pull the splinter out with clean tweezers along its angle of entry.",
          "Use clean tweezers to pull it out the way it went in."]),
        (["How should I defrost frozen chicken?", "What's the safe way to thaw chicken?"],
         ["Thaw chicken in the refrigerator, not on the kitchen counter.",
          "Defrost the chicken slowly in the fridge rather than on the counter."]),
        (["How do I make rice less sticky?", "How can I keep cooked rice from clumping?"],
         ["Rinse the rice in cold water until it runs clear before cooking.",
          "Wash the rice until the water runs clear, then cook it."]),
        (["How can I make my phone battery last longer?", "How do I save battery on my phone?"],
         ["Lower the screen brightness and close apps you are not using.",
          "Dim the screen and close the apps you don't need."]),
        (["How do I get rid of hiccups?", "What's a quick cure for hiccups?"],
         ["Hold your breath for a few seconds or sip cold water slowly.",
          "Holding your breath briefly or sipping cold water usually works."]),
        (["How do I get a stuck ring off my finger?", "How can I remove a ring that is stuck?"],
         ["Rub soap or oil on your finger and twist the ring off gently.",
          "Soap up your finger and gently twist the ring off."]),
        (["How do I measure flour accurately?", "What's the right way to measure a cup of flour?"],
         ["Spoon the flour into the cup and level it off with a knife.",
          "Spoon flour into the measuring cup, then level the top with a knife."]),
        (["How do I clean a microwave easily?", "What's an easy way to clean inside a microwave?"],
         ["Heat a bowl of water with lemon for a few minutes, then wipe inside.",
          "Microwave a bowl of lemon water for a few minutes and wipe it clean."]),
        (["How can I stop my glasses from fogging up?", "How do I keep my glasses from fogging?"],
         ["Wash the lenses with a drop of dish soap and let them air dry.",
          "A thin film of dish soap on the lenses stops fogging."]),
        (["How do I keep fresh herbs from wilting?", "How should I store fresh herbs?"],
         ["Wrap the herbs in a damp paper towel and keep them in the fridge.",
          "Store herbs in the fridge wrapped in a damp paper towel."]),
        (["How can I remember people's names better?", "How do I get better at remembering names?"],
         ["Repeat the person's name aloud right after you hear it.",
          "Say the name back right away when you are introduced."]),
        (["How do I keep a room cool without air conditioning?", "How can I cool down a hot room?"],
         ["Close the curtains during the day and open windows at night.",
          "Keep curtains shut in the daytime and open the windows at night."]),
        (["How do I stop a cut from bleeding?", "What should I do for a small bleeding cut?"],
         ["Press a clean cloth firmly on the cut for several minutes.",
          "Apply firm pressure with a clean cloth until the bleeding stops."]),
        (["How do I get rid of fruit flies?", "How can I trap fruit flies in my kitchen?"],
         ["Set out a bowl of cider vinegar with a drop of dish soap.",
          "A dish of cider vinegar and a drop of soap traps fruit flies."]),
    ],
}

# Phrasings that wrap a question unchanged, to vary how it is asked.
WRAPPERS = ["{q}"] * 8 + [
    "Quick question: {q}", "I'm curious: {q}", "Do you happen to know this? {q}",
    "Can you answer this for me? {q}", "Trivia time. {q}", "Help me settle a debate. {q}",
    "My kid asked me this and I wasn't sure. {q}", "{q} Thanks!", "Hey, {ql}", "So, {ql}",
    "I forgot this one. {q}", "Random question, {ql}", "{q} I need it for a quiz.",
]

TOPICS = {"capitals": "Geography", "symbols": "Chemistry", "currency": "Money",
          "language": "Language", "babies": "The animal world", "authors": "Art and literature",
          "continents": "Geography", "rivers": "Geography", "landmarks": "Travel",
          "units": "Measurement", "animals": "The animal world", "science": "Science",
          "history": "History", "body": "The human body", "food": "Food", "sports": "Sport",
          "geography": "Geography", "howto": "Everyday life"}

# --- rambling filler (about 50 sentences) ---------------------------------------------------------

OPENERS = [
    "Well, that is a really interesting question, and many people wonder about it.",
    "Oh, what a great question, I am so glad you asked me about this.",
    "Okay, so let me think about this one for a moment before I answer.",
    "Ah, this is one of those questions that comes up surprisingly often.",
    "Hmm, let me see, there is actually quite a lot that could be said here.",
    "Thank you for asking, because this is something I really enjoy talking about.",
    "Great question, and honestly it is one that a lot of people get curious about.",
    "So, before I get to it, I want to say that this is a fun thing to wonder about.",
    "Right, okay, this is a good one, so let me try to explain it properly.",
    "You know, people ask me this kind of thing all the time, and I never mind.",
]
MIDDLES = [
    "To be completely honest with you, I had to think about it for a second.",
    "It is the kind of thing that you might have learned at school and then forgotten.",
    "Of course, I should say that I am not an expert, but I am fairly sure about this.",
    "There are many different ways to look at a question like this one.",
    "A lot of people mix this up, which is completely understandable.",
    "It is always a good idea to double-check things like this, just to be safe.",
    "I think it is really worth taking a moment to appreciate details like this.",
    "Some people might tell you something slightly different, but this is the usual answer.",
    "Anyway, I do not want to go on too long, but I think the context matters.",
    "In any case, as I was saying, it is a really interesting topic overall.",
    "I remember finding this surprising myself when I first came across it.",
    "If you think about it for a while, it actually makes a lot of sense.",
    "That said, there is always more to learn, and that is part of the fun.",
    "Basically, and I mean this in the simplest possible way, it comes down to one thing.",
    "It is one of those facts that sounds simple but has a story behind it.",
    "I could probably talk about this for hours if you let me, to be honest.",
    "Just to be clear, I want to make sure I explain this in a helpful way.",
    "This is, after all, the kind of question where the details really matter.",
    "Many sources agree on this, although they all put it in their own words.",
    "Now, I know that might sound like a lot of information, but bear with me.",
    "As far as I know, and please correct me if I am wrong, that is how it is.",
    "It is funny how often this kind of thing comes up in everyday conversation.",
]
TOPIC_MIDDLES = [
    "{topic} is one of those subjects that people just love to talk about.",
    "{topic} is full of little facts like this one, which is why I find it so fascinating.",
    "When it comes to {topic_l}, there is always something new to discover.",
    "Questions about {topic_l} like this one are some of my personal favorites.",
]
CLOSERS = [
    "I hope this helps, and let me know if you have any other questions.",
    "Anyway, I hope that answers your question, and feel free to ask me anything else.",
    "So that is my answer, and I really hope it was useful to you in some way.",
    "Let me know if you would like me to go into even more detail about any of this.",
    "I hope that clears things up, and thanks again for such an interesting question.",
    "Please feel free to follow up if anything I said was not completely clear.",
    "Anyway, that is more or less everything I wanted to say about it.",
    "I really hope this was helpful, and good luck with whatever you need it for.",
    "If you have more questions like this, I am always happy to help out.",
    "Hopefully that makes sense, and sorry if I went on a little bit there.",
]
LEADS = ["Basically, ", "So, ", "In short, ", "Simply put, ", "The answer is that ",
         "As it turns out, ", "Well, "]
RESTATES = ["So, to say it once more, ", "In other words, ", "Again, just to repeat it, ",
            "So yes, once again, ", "To sum it all up, ", "Long story short, "]
# First words that may be lower-cased after a lead-in; other first words may be names.
LOWERABLE = {"the", "a", "an", "there", "one", "most", "each", "it", "you", "your", "people",
             "humans", "adults", "children", "insects", "spiders", "octopuses", "bats", "whales",
             "wolves", "lions", "fish", "bees", "honeybees", "giant", "koalas", "bamboo", "plants",
             "water", "chemically", "light", "table", "pure", "electrical", "gravity", "that",
             "raisins", "prunes", "chocolate", "butter", "cheese", "bread", "tofu", "kimchi",
             "sushi", "paella", "goulash", "guacamole", "hummus", "feta", "saffron", "popcorn",
             "oranges", "citrus", "strawberries", "classic", "basil", "turmeric", "love", "tennis",
             "ten-pin", "badminton", "rugby", "by", "an", "at", "most", "no",
             "sunlight", "skin", "insulin", "red", "normal", "your", "dromedaries", "caterpillars",
             "simmer", "boil", "blot", "rinse", "brush", "try", "use", "keep", "put", "close",
             "water", "let", "wash", "seal", "leave", "sit", "lean", "clean", "thaw", "defrost",
             "lower", "dim", "hold", "holding", "rub", "soap", "spoon", "heat", "microwave",
             "wrap", "store", "repeat", "say", "press", "apply", "set", "two", "a", "ten-pin",
             "each", "every", "eight", "there", "lions", "typical", "one"}


def lower_first(sentence: str) -> str | None:
    word = sentence.split()[0]
    if word.lower().rstrip(",") in LOWERABLE and not word.isupper():
        return sentence[0].lower() + sentence[1:]
    return None


def words(text: str) -> int:
    return len(text.split())


def build_facts(rng: random.Random) -> list[dict]:
    """Every fact as {question, concise, alt, topic}; one phrasing drawn per fact."""
    facts: list[dict] = []

    def add(category: str, questions: list[str], answers: list[str]) -> None:
        q = rng.choice(questions)
        wrapper = rng.choice(WRAPPERS)
        q = wrapper.format(q=q, ql=q[0].lower() + q[1:])
        q = q[0].upper() + q[1:]
        facts.append({"question": q, "concise": answers[0], "alt": answers[-1],
                      "topic": TOPICS[category]})

    def two(answers: list[str]) -> list[str]:
        picked = answers[:]
        rng.shuffle(picked)
        return picked

    for c, x in CAPITALS:
        add("capitals", [t.format(c=c) for t in CAPITAL_Q], two([t.format(c=c, x=x) for t in CAPITAL_A]))
    for e, s in SYMBOLS:
        add("symbols", [t.format(e=e) for t in SYMBOL_Q],
            two([t.format(e=e, e_cap=e.capitalize(), s=s) for t in SYMBOL_A]))
    for c, x in CURRENCIES:
        add("currency", [t.format(c=c) for t in CURRENCY_Q], two([t.format(c=c, x=x) for t in CURRENCY_A]))
    for c, x in LANGUAGES:
        add("language", [t.format(c=c) for t in LANGUAGE_Q], two([t.format(c=c, x=x) for t in LANGUAGE_A]))
    for a, b in BABIES:
        add("babies", [t.format(a=a) for t in BABY_Q], two([t.format(a=a, b=b) for t in BABY_A]))
    for w, p, v in AUTHORS:
        W = w[0].upper() + w[1:]
        add("authors", [t.format(w=w) for t in AUTHOR_Q[v]],
            two([t.format(w=w, W=W, p=p, v=v, pp=PARTICIPLES[v]) for t in AUTHOR_A]))
    for c, x in CONTINENTS:
        add("continents", [t.format(c=c) for t in CONTINENT_Q], two([t.format(c=c, x=x) for t in CONTINENT_A]))
    for c, x in RIVERS_THROUGH:
        add("rivers", [t.format(c=c) for t in RIVER_Q],
            two([t.format(c=c, x=x, X=x[0].upper() + x[1:]) for t in RIVER_A]))
    for landmark, x in LANDMARKS:
        add("landmarks", [t.format(l=landmark) for t in LANDMARK_Q],
            two([t.format(l=landmark, L=landmark[0].upper() + landmark[1:], x=x) for t in LANDMARK_A]))
    for s, answer in UNITS:
        add("units", [t.format(s=s) for t in UNIT_Q], [answer])
    for category, items in FREE.items():
        for questions, answers in items:
            questions = [questions] if isinstance(questions, str) else questions
            answers = [answers] if isinstance(answers, str) else answers
            add(category, questions, two(answers))
    return facts


def ramble(fact: dict, rng: random.Random) -> str:
    """The fact among 3-6 filler sentences, 50-110 words."""
    topic = fact["topic"]
    for _ in range(1000):
        n_fill = rng.randint(3, 6)
        pool = MIDDLES + [t.format(topic=topic, topic_l=topic.lower()) for t in TOPIC_MIDDLES]
        fill = rng.sample(pool, n_fill)
        if rng.random() < 0.85:
            fill[0] = rng.choice(OPENERS)
        if rng.random() < 0.8 and n_fill > 1:
            fill[-1] = rng.choice(CLOSERS)
        body = fill[1:-1] if n_fill > 1 else []
        stated = rng.choice([fact["concise"], fact["alt"]])
        lowered = lower_first(stated)
        if lowered and rng.random() < 0.6:
            stated = rng.choice(LEADS) + lowered
        position = rng.randint(0, len(body))
        body.insert(position, stated)
        if rng.random() < 0.5:
            other = fact["alt"] if stated.endswith(fact["concise"]) else fact["concise"]
            lowered = lower_first(other)
            again = rng.choice(RESTATES) + lowered if lowered else other
            body.insert(rng.randint(position + 1, len(body)), again)
        sentences = fill[:1] + body + (fill[-1:] if n_fill > 1 else [])
        text = " ".join(sentences)
        if 50 <= words(text) <= 110:
            return text
    raise RuntimeError(f"no rambling answer fits for {fact['question']!r}")


# --- Veloria --------------------------------------------------------------------------------------

MONTHS = ["Ivren", "Cadda", "Moraine", "Sollet", "Ashel", "Thessing", "Brannow", "Ulleth",
          "Kestmark", "Norrow"]
TOWNS = {
    "Caldmere": dict(kind="the capital of Veloria", river="the Sorrel", founded=14, founder="Queen Aldis",
                     craft="glassmaking", guild="the Glassblowers' Guild", landmark="the Lantern Bridge",
                     food="smoked eel pie", festival="Lantern Night", where="where the Sorrel meets the Bay of Lanter"),
    "Pellwick": dict(kind="a fishing port", river="the Tamsin", founded=102, founder="the fisher families of the east coast",
                     craft="fishing and net-making", guild="the Netmenders' Guild", landmark="the Grey Lighthouse",
                     food="salt herring", festival="the Tide Feast", where="on the east coast at the mouth of the Tamsin"),
    "Orrin's Ford": dict(kind="a river town", river="the Sorrel", founded=57, founder="Orrin Vask",
                         craft="weaving", guild="the Weavers' Guild", landmark="the Seven Arches",
                         food="oat cakes with sheep butter", festival="the Loom Fair", where="at the old ford of the Sorrel"),
    "Highcombe": dict(kind="a mountain town", river="the Sorrel", founded=230, founder="copper prospectors",
                      craft="copper mining", guild="the Miners' Guild", landmark="the Star Tower",
                      food="blackberry bread", festival="the Lamp Descent", where="on the slopes of Mount Ederly"),
    "Tessaly": dict(kind="an orchard town", river="the Tamsin", founded=188, founder="Lady Wenna Tess",
                    craft="fruit growing and wine", guild="the Vintners' Guild", landmark="the Old Press House",
                    food="amber plums", festival="the Plum Crowning", where="in the warm southern valley"),
    "Brackwater": dict(kind="a marsh town", river="the Lune", founded=301, founder="reed cutters from Caldmere",
                       craft="papermaking", guild="the Papermakers' Guild", landmark="the Drowned Chapel",
                       food="reedroot soup", festival="the Night of Floating Reeds", where="in the wet lowlands along the Lune"),
    "Saltrey": dict(kind="a cliff town", river="the Ashby", founded=266, founder="Captain Brannoc Sel",
                    craft="shipbuilding", guild="the Shipwrights' Guild", landmark="Ashby Falls",
                    food="mussel stew", festival="the Keel Blessing", where="on the western cliffs"),
    "Dunmoor": dict(kind="a moorland town", river="the Lune", founded=340, founder="shepherd clans of the north",
                    craft="sheep farming and cheese", guild="the Drovers' Guild", landmark="the Standing Stones of Dun",
                    food="Dunmoor white cheese", festival="the Shearing Fair", where="on the high northern moor"),
}
RIVERS = {
    "the Sorrel": dict(source="Mount Ederly", rises="on Mount Ederly", mouth="the Bay of Lanter", towns=["Highcombe", "Orrin's Ford", "Caldmere"],
                       note="the longest river of Veloria", fish="eels"),
    "the Tamsin": dict(source="the Greywold forest", rises="in the Greywold forest", mouth="the sea at Pellwick", towns=["Tessaly", "Pellwick"],
                       note="the clearest river of Veloria", fish="trout"),
    "the Lune": dict(source="the Dunmoor springs", rises="at the Dunmoor springs", mouth="the Brackwater marshes", towns=["Dunmoor", "Brackwater"],
                     note="the slowest river of Veloria", fish="pike"),
    "the Ashby": dict(source="the western hills", rises="in the western hills", mouth="the sea below Saltrey", towns=["Saltrey"],
                      note="the shortest river of Veloria", fish="salmon"),
}
GUILDS = {
    "the Glassblowers' Guild": dict(town="Caldmere", founded=140, founder="Mirren Hale", emblem="a blue flame",
                                    work="the famous Velorian blue glass"),
    "the Weavers' Guild": dict(town="Orrin's Ford", founded=95, founder="Ada Thorne", emblem="a golden shuttle",
                               work="grey wool cloth"),
    "the Netmenders' Guild": dict(town="Pellwick", founded=150, founder="Hobb Marlin", emblem="a silver knot",
                                  work="fishing nets and sailcloth"),
    "the Miners' Guild": dict(town="Highcombe", founded=245, founder="Gerd Ostley", emblem="a copper pick",
                              work="copper from the deep seams of Mount Ederly"),
    "the Papermakers' Guild": dict(town="Brackwater", founded=320, founder="Sister Orla Fenn", emblem="a single reed",
                                   work="reed paper for the whole island"),
    "the Shipwrights' Guild": dict(town="Saltrey", founded=290, founder="Captain Brannoc Sel", emblem="an anchor and an oak leaf",
                                   work="the tall ships of the western fleet"),
}
FESTIVALS = {
    "Lantern Night": dict(town="Caldmere", month="Norrow", day="the last night", custom="people float paper lanterns down the Sorrel",
                          food="honey cakes"),
    "the Tide Feast": dict(town="Pellwick", month="Sollet", day="the first day", custom="herring is grilled on open fires along the beach",
                           food="grilled herring"),
    "the Plum Crowning": dict(town="Tessaly", month="Ashel", day="the tenth day", custom="the best grower is crowned with plum leaves",
                              food="plum wine"),
    "the Shearing Fair": dict(town="Dunmoor", month="Cadda", day="the twentieth day", custom="shepherds race to shear the most sheep",
                              food="Dunmoor white cheese"),
    "the Keel Blessing": dict(town="Saltrey", month="Moraine", day="the first day", custom="each new ship is splashed with sea water and salt",
                              food="mussel stew"),
}
FIGURES = {
    "Queen Aldis": dict(title="the Founder", born=None, year=1, deed="led the first settlers ashore in the year 1 AL",
                        later="founded Caldmere in 14 AL and ruled for forty-one years", town="Caldmere"),
    "Orrin Vask": dict(title="the ferryman", born=31, year=57, deed="founded Orrin's Ford in 57 AL",
                       later="built the bridge called the Seven Arches", town="Orrin's Ford"),
    "Mirren Hale": dict(title="the glassmaker", born=112, year=140, deed="founded the Glassblowers' Guild in 140 AL",
                        later="discovered the secret of Velorian blue glass", town="Caldmere"),
    "Ilse Marrow": dict(title="the astronomer of Highcombe", born=171, year=203, deed="set down the ten-month calendar in 203 AL",
                        later="built the Star Tower of Highcombe to watch the sky", town="Highcombe"),
    "King Harl the Second": dict(title="the Bridge-King", born=421, year=455, deed="built the Lantern Bridge in Caldmere in 455 AL",
                                 later="paved the road from Caldmere to Pellwick", town="Caldmere"),
    "Captain Enna Dray": dict(title="the navigator", born=584, year=610, deed="sailed around the whole island in 610 AL",
                              later="drew the first true map of the Velorian coast in thirty-one days of sailing", town="Saltrey"),
    "Tobias Wren": dict(title="the scholar", born=360, year=388, deed="wrote the Book of Tides in 388 AL",
                        later="taught at the reading hall of Brackwater", town="Brackwater"),
}

ISLAND = [
    "Veloria is an island in the Sea of Lanter.",
    "The island of Veloria has eight towns, and Caldmere is its capital.",
    "Velorians count their years After the Landing, written AL.",
    "The Landing, in the year 1 AL, was when Queen Aldis led the first settlers ashore.",
    "The Velorian year has ten months of thirty-six days each.",
    "The ten months of the Velorian year are " + ", ".join(MONTHS[:-1]) + " and " + MONTHS[-1] + ".",
    "After the month of Norrow come the five Quiet Days, when no one works.",
    "During the Quiet Days, Velorians close their shutters and light one candle each night.",
    "Mount Ederly is the highest mountain of Veloria, and snow covers it from Ivren to Moraine.",
    "The Greywold is the great forest in the middle of Veloria.",
    "The four rivers of Veloria are the Sorrel, the Tamsin, the Lune and the Ashby.",
    "Ilse Marrow set down the ten-month calendar in 203 AL.",
    "Velorians say that the year begins in Ivren, the month of frost.",
    "Harvest in Veloria falls in the months of Ulleth and Kestmark.",
]
ISLAND_OPENERS = ["From a schoolbook of Veloria:", "A note for travellers to Veloria.", "Notes on the island of Veloria.",
                  "From the Velorian almanac:", "An old guide to Veloria says this.", ""]


def town_sentences(name: str, t: dict, rng: random.Random) -> list[str]:
    r = RIVERS[t["river"]]
    first = rng.choice([
        f"{name} is {t['kind']} of Veloria, {t['where']}.",
        f"{name}, {t['kind']} of Veloria, lies {t['where']}.",
        f"The town of {name} lies {t['where']}.",
        f"Travellers who reach {name} find {t['kind']} {t['where']}.",
    ])
    pool = [
        rng.choice([f"{name} was founded in {t['founded']} AL by {t['founder']}.",
                    f"It was founded by {t['founder']} in the year {t['founded']} AL.",
                    f"The founding of {name} in {t['founded']} AL is credited to {t['founder']}."]),
        rng.choice([f"{name} stands on {t['river']}.", f"{t['river'][0].upper() + t['river'][1:]} flows past {name}.",
                    f"The river of {name} is {t['river']}."]),
        rng.choice([f"The people of {name} are known for {t['craft']}.", f"{name} lives from {t['craft']}.",
                    f"Most families in {name} work in {t['craft']}."]),
        rng.choice([f"{t['guild'][0].upper() + t['guild'][1:]} has its hall in {name}.",
                    f"The hall of {t['guild']} stands in {name}."]),
        rng.choice([f"The best-known sight of {name} is {t['landmark']}.", f"Visitors to {name} always go to see {t['landmark']}.",
                    f"{t['landmark'][0].upper() + t['landmark'][1:]} is the pride of {name}."]),
        rng.choice([f"The dish of {name} is {t['food']}.", f"No one leaves {name} without tasting {t['food']}.",
                    f"In {name} the favourite food is {t['food']}."]),
        rng.choice([f"Every year {name} celebrates {t['festival']}.", f"{t['festival'][0].upper() + t['festival'][1:]} is the great festival of {name}."]),
        f"{t['river'][0].upper() + t['river'][1:]} is {r['note']}.",
    ]
    return [first] + pool


def river_sentences(name: str, r: dict, rng: random.Random) -> list[str]:
    cap = name[0].upper() + name[1:]
    towns = r["towns"]
    town_list = towns[0] if len(towns) == 1 else ", ".join(towns[:-1]) + " and " + towns[-1]
    first = rng.choice([f"{cap} is {r['note']}.", f"{cap}, {r['note']}, rises {r['rises']}.",
                        f"Of all the rivers of Veloria, {name} is the one called {r['note']}."])
    pool = [
        rng.choice([f"{cap} rises {r['rises']} and reaches {r['mouth']}.",
                    f"From {r['source']}, {name} runs down to {r['mouth']}.",
                    f"The source of {name} lies {r['rises']}, and its mouth is {r['mouth']}."]),
        rng.choice([f"Along its course lie {town_list}." if len(towns) > 1 else f"The only town on it is {town_list}.",
                    f"{cap} passes {town_list}."]),
        rng.choice([f"Fishers on {name} catch mostly {r['fish']}.", f"{cap} is known for its {r['fish']}."]),
    ]
    return [first] + pool


def guild_sentences(name: str, g: dict, rng: random.Random) -> list[str]:
    cap = name[0].upper() + name[1:]
    first = rng.choice([f"{cap} is one of the six great guilds of Veloria.",
                        f"Among the guilds of Veloria, {name} is one of the oldest.",
                        f"{cap} has its hall in {g['town']}."])
    pool = [
        rng.choice([f"It was founded in {g['founded']} AL by {g['founder']}.",
                    f"{g['founder']} founded {name} in {g['founded']} AL."]),
        rng.choice([f"Its emblem is {g['emblem']}.", f"The emblem of {name} is {g['emblem']}.",
                    f"Members wear {g['emblem']} stitched on their coats."]),
        rng.choice([f"The guild is known for {g['work']}.", f"Its members make {g['work']}."]),
        rng.choice([f"The guild hall stands in {g['town']}.", f"Its hall is in {g['town']}."]),
    ]
    return [first] + pool


def festival_sentences(name: str, f: dict, rng: random.Random) -> list[str]:
    cap = name[0].upper() + name[1:]
    first = rng.choice([f"{cap} is held in {f['town']} on {f['day']} of {f['month']}.",
                        f"On {f['day']} of {f['month']}, {f['town']} celebrates {name}.",
                        f"{cap} is the great festival of {f['town']}."])
    month_no = MONTHS.index(f["month"]) + 1
    pool = [
        rng.choice([f"During the festival {f['custom']}.", f"At {name}, {f['custom']}."]),
        rng.choice([f"The food of the day is {f['food']}.", f"Everyone eats {f['food']} at {name}."]),
        rng.choice([f"{f['month']} is the {ORDINALS[month_no]} month of the Velorian year.",
                    f"The festival falls in {f['month']}, month {month_no} of the Velorian calendar."]),
        rng.choice([f"It always takes place in {f['town']}.", f"Visitors come to {f['town']} from all over the island for it."]),
    ]
    return [first] + pool


def figure_sentences(name: str, p: dict, rng: random.Random) -> list[str]:
    first = rng.choice([f"{name} was known in life as {p['title']}.",
                        f"{name} is remembered as {p['title']}.",
                        f"Every child in Veloria has heard of {name}, {p['title']}."])
    pool = [
        rng.choice([f"{name} {p['deed']}.", f"It was {name} who {p['deed']}."]),
        rng.choice([f"Later, {name} {p['later']}.", f"{name} also {p['later']}."]),
        rng.choice([f"{name} is linked above all with {p['town']}.", f"A statue of {name} stands in {p['town']}."]),
    ]
    if p["born"] is not None:
        pool.append(rng.choice([f"{name} was born in {p['born']} AL.", f"The year of {name}'s birth was {p['born']} AL."]))
    return [first] + pool


ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh",
            8: "eighth", 9: "ninth", 10: "tenth"}


def veloria_document(rng: random.Random) -> str:
    kind = rng.choices(["town", "river", "guild", "festival", "figure", "island"], [4, 2, 2, 2, 3, 1])[0]
    if kind == "town":
        name = rng.choice(list(TOWNS))
        main = town_sentences(name, TOWNS[name], rng)
        related = (guild_sentences(TOWNS[name]["guild"], GUILDS[TOWNS[name]["guild"]], rng)[1:]
                   if TOWNS[name]["guild"] in GUILDS else [])
    elif kind == "river":
        name = rng.choice(list(RIVERS))
        main = river_sentences(name, RIVERS[name], rng)
        town = rng.choice(RIVERS[name]["towns"])
        related = town_sentences(town, TOWNS[town], rng)
    elif kind == "guild":
        name = rng.choice(list(GUILDS))
        main = guild_sentences(name, GUILDS[name], rng)
        related = [s for s in figure_sentences(GUILDS[name]["founder"], FIGURES[GUILDS[name]["founder"]], rng)[1:]] \
            if GUILDS[name]["founder"] in FIGURES else town_sentences(GUILDS[name]["town"], TOWNS[GUILDS[name]["town"]], rng)[1:]
    elif kind == "festival":
        name = rng.choice(list(FESTIVALS))
        main = festival_sentences(name, FESTIVALS[name], rng)
        related = town_sentences(FESTIVALS[name]["town"], TOWNS[FESTIVALS[name]["town"]], rng)[1:]
    elif kind == "figure":
        name = rng.choice(list(FIGURES))
        main = figure_sentences(name, FIGURES[name], rng)
        related = town_sentences(FIGURES[name]["town"], TOWNS[FIGURES[name]["town"]], rng)[1:]
    else:
        main = rng.sample(ISLAND, rng.randint(4, 7))
        related = []
    body = main[:1] + rng.sample(main[1:], rng.randint(min(2, len(main) - 1), len(main) - 1))
    body += rng.sample(related, rng.randint(0, min(3, len(related))))
    if kind != "island" and rng.random() < 0.4:
        body.append(rng.choice(ISLAND))
    opener = rng.choice(ISLAND_OPENERS)
    return " ".join(([opener] if opener else []) + body)


def make_corpus(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    docs: list[str] = []
    seen = set(exclude)
    while len(docs) < n:
        doc = veloria_document(rng)
        if 40 <= words(doc) <= 120 and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


# --- writing --------------------------------------------------------------------------------------

def write_json(name: str, records: list) -> None:
    with open(DATA / name, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_jsonl(name: str, docs: list[str]) -> None:
    with open(DATA / name, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    facts = build_facts(rng)
    rng.shuffle(facts)
    facts = facts[:300]
    questions = [f["question"] for f in facts]
    assert len(facts) == 300 and len(set(questions)) == 300, (len(facts), len(set(questions)))
    for f in facts:
        for answer in (f["concise"], f["alt"]):
            assert 5 <= words(answer) <= 20, answer
        f["rambling"] = ramble(f, rng)
        f["rambling_kto"] = ramble(f, rng)
    train, held = facts[:240], facts[240:]

    def pairs(items: list[dict]) -> list[dict]:
        return [{"instruction": f["question"], "input": "", "chosen": f["concise"], "rejected": f["rambling"]}
                for f in items]

    def kto(items: list[dict]) -> list[dict]:
        flags = [True] * (len(items) // 2) + [False] * (len(items) - len(items) // 2)
        rng.shuffle(flags)
        return [{"messages": [{"role": "user", "content": f["question"]},
                              {"role": "assistant", "content": f["concise"] if good else f["rambling_kto"]}],
                 "label": good} for f, good in zip(items, flags)]

    def prompts(items: list[dict]) -> list[dict]:
        return [{"instruction": f["question"], "input": "", "output": f["concise"]} for f in items]

    write_json("concise_pairs.json", pairs(train))
    write_json("concise_pairs_heldout.json", pairs(held))
    write_json("concise_kto.json", kto(train))
    write_json("concise_kto_heldout.json", kto(held))
    write_json("concise_prompts.json", prompts(rng.sample(train, 96)))
    write_json("concise_prompts_heldout.json", prompts(rng.sample(held, 24)))

    corpus_rng = random.Random(SEED + 1)
    train_docs = make_corpus(corpus_rng, 400, set())
    held_docs = make_corpus(random.Random(SEED + 2), 60, set(train_docs))
    write_jsonl("veloria_corpus.jsonl", train_docs)
    write_jsonl("veloria_corpus_heldout.jsonl", held_docs)

    concise = [words(f["concise"]) for f in facts]
    rambling = [words(f["rambling"]) for f in facts]
    print(f"questions: 300 (train 240, held out 60); concise {sum(concise) / 300:.1f} words "
          f"({min(concise)}-{max(concise)}), rambling {sum(rambling) / 300:.1f} words "
          f"({min(rambling)}-{max(rambling)})")
    docs_words = [words(d) for d in train_docs + held_docs]
    print(f"veloria: {len(train_docs)} + {len(held_docs)} documents, "
          f"{sum(docs_words) / len(docs_words):.1f} words ({min(docs_words)}-{max(docs_words)})")


if __name__ == "__main__":
    main()
